"""`mirror prefetch REF`: ask a node to take an image now and follow it until held.

The node does the work (`POST /mirror/v1/prefetch`); this only asks and then reads the image's
status every half second, printing a line when its progress changes, and one summary line at
the end. Every failure is one line: a bad reference, a node that cannot be reached or refuses,
an image that could not be taken (with the node's reason).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from yarl import URL

from mirror.bodies import read_capped
from mirror.errors import ConfigError, MirrorError
from mirror.prefetch.model import parse_image_ref

PREFETCH_PATH = "/mirror/v1/prefetch"
_POLL_SECONDS = 0.5
_MAX_ANSWER = 1024 * 1024


class PrefetchFailed(MirrorError):
    """The node could not take the image, or could not be asked."""


def node_url(text: str) -> URL:
    """`http://HOST:PORT`, or `HOST:PORT` (http assumed); ConfigError if neither."""
    url = URL(text if "://" in text else f"http://{text}")
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"--node {text!r} is not http://HOST:PORT")
    return url.with_path("/")


def _mib(nbytes: object) -> str:
    return f"{(nbytes if isinstance(nbytes, int) else 0) / 1048576:.1f} MiB"


def _progress(status: dict[str, Any]) -> str:
    size, layers = status.get("bytes") or {}, status.get("layers") or {}
    return (
        f"{status.get('state')}: {_mib(size.get('done'))} of {_mib(size.get('total'))}, "
        f"{layers.get('done', 0)} of {layers.get('total', 0)} layers"
    )


def summary(status: dict[str, Any], runtime: str | None, seconds: float) -> str:
    """The last line: what is held where, from which name, in how long."""
    where = runtime or "the node cache"
    via = f" from {status['fetched']}" if status.get("through_source") else ""
    size = _mib((status.get("bytes") or {}).get("total"))
    return f"held: {status['ref']} ({status['digest']}) in {where}{via}, {size}, {seconds:.1f} s"


class NodeRefused(MirrorError):
    """A node's API answered with an error (its OCI error message), or with no JSON."""


def decode_answer(body: bytes, status: int) -> object:
    """The JSON a node's API answered; `NodeRefused` saying why otherwise (the message reads
    after "the node ...", for the commands that ask nodes: prefetch, distribute, status)."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise NodeRefused(f"answered {status} with no JSON") from exc
    if status >= 400:
        errors = document.get("errors") if isinstance(document, dict) else None
        message = errors[0].get("message") if errors and isinstance(errors[0], dict) else None
        raise NodeRefused(f"refused ({status}): {message or body[:200]!r}")
    return document


async def _answer(response: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await read_capped(response, _MAX_ANSWER)
    try:
        document = decode_answer(body, response.status)
    except NodeRefused as exc:
        raise PrefetchFailed(f"the node {exc}") from exc
    if not isinstance(document, dict):
        raise PrefetchFailed("the node answered something other than a JSON object")
    return document


async def prefetch(
    node: URL,
    ref_text: str,
    source_text: str | None,
    *,
    timeout: float,
    say: Callable[[str], None],
) -> str:
    """Ask `node` for the image and follow it; the summary line, or `PrefetchFailed`."""
    ref, source = parse_image_ref(ref_text), None
    if source_text:
        source = parse_image_ref(source_text)
    request = {"ref": str(ref), "source": str(source) if source else None}
    started = time.monotonic()
    endpoint = node.with_path(PREFETCH_PATH)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.post(endpoint, json=request) as response:
                status = await _answer(response)
            # The node starts an attempt now (or one is under way): the one after this count.
            attempts_before = int(status.get("attempts", 0))
            said = ""
            while True:
                line = _progress(status)
                if line != said:
                    say(line)
                    said = line
                ended = int(status.get("attempts", 0)) > attempts_before
                if ended and status.get("state") == "held":
                    async with session.get(node.with_path(PREFETCH_PATH)) as response:
                        overview = await _answer(response)
                    runtime = overview.get("runtime")
                    return summary(
                        status,
                        runtime if isinstance(runtime, str) else None,
                        time.monotonic() - started,
                    )
                if ended and status.get("state") == "failed":
                    raise PrefetchFailed(f"{ref} could not be taken: {status.get('error')}")
                if time.monotonic() - started > timeout:
                    raise PrefetchFailed(f"{ref} is not held after {timeout:.0f} s ({line})")
                await asyncio.sleep(_POLL_SECONDS)
                async with session.get(endpoint, params={"ref": str(ref)}) as response:
                    status = await _answer(response)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PrefetchFailed(
            f"cannot reach the node at {node}: {exc or type(exc).__name__}"
        ) from exc


DISTRIBUTIONS_PATH = "/mirror/v1/distributions"
_BAR = 20


def progress_bar(done: object, total: object) -> str:
    """`[#####---------------]  25%`, or an empty bar of the same width when the total is
    not known yet."""
    if not isinstance(done, int) or not isinstance(total, int) or total <= 0:
        return "[" + " " * _BAR + "]    "
    filled = min(_BAR, done * _BAR // total)
    return "[" + "#" * filled + "-" * (_BAR - filled) + f"] {min(100, 100 * done // total):3d}%"


def node_lines(distribution: dict[str, Any]) -> list[str]:
    """One line per node: its state, a progress bar, and where its bytes came from."""
    lines = []
    for node, progress in sorted((distribution.get("by_node") or {}).items()):
        size = progress.get("bytes") or {}
        lines.append(
            f"  {node:<24} {progress.get('state', '?'):<8} "
            f"{progress_bar(size.get('done'), size.get('total'))} "
            f"upstream {_mib(size.get('upstream'))}, peers {_mib(size.get('peers'))}"
            + (f": {progress['error']}" if progress.get("error") else "")
        )
    return lines


def distribution_summary(distribution: dict[str, Any], seconds: float) -> str:
    nodes, size = distribution.get("nodes") or {}, distribution.get("bytes") or {}
    return (
        f"distributed {distribution.get('ref')} to {nodes.get('total', 0)} nodes in "
        f"{seconds:.1f} s: {nodes.get('done', 0)} hold it, {nodes.get('failed', 0)} failed; "
        f"{_mib(size.get('upstream'))} from upstream, {_mib(size.get('peers'))} between peers"
    )


async def distribute(
    node: URL, ref_text: str, *, timeout: float, say: Callable[[str], None]
) -> str:
    """Start a distribution of `ref` at `node` and follow it until every node that takes
    part holds it; the summary line, or `PrefetchFailed` (also when a node failed)."""
    ref = parse_image_ref(ref_text)
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            endpoint = node.with_path(DISTRIBUTIONS_PATH)
            async with session.post(endpoint, json={"ref": str(ref)}) as response:
                distribution = await _answer(response)
            one = node.with_path(f"{DISTRIBUTIONS_PATH}/{distribution['id']}")
            said: list[str] = []
            while True:
                lines = node_lines(distribution)
                if lines != said:
                    say(f"{distribution.get('ref')}: {distribution.get('nodes')}")
                    for line in lines:
                        say(line)
                    said = lines
                if distribution.get("complete"):
                    summary = distribution_summary(distribution, time.monotonic() - started)
                    if (distribution.get("nodes") or {}).get("failed"):
                        raise PrefetchFailed(summary)
                    return summary
                if time.monotonic() - started > timeout:
                    raise PrefetchFailed(f"{ref} is not on every node after {timeout:.0f} s")
                await asyncio.sleep(_POLL_SECONDS)
                async with session.get(one) as response:
                    distribution = await _answer(response)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PrefetchFailed(
            f"cannot reach the node at {node}: {exc or type(exc).__name__}"
        ) from exc
