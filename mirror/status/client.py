"""`mirror status`: a node's status report as terminal tables, or as its JSON.

Reads `GET /mirror/v1/status` (the node's registry port by default, the metrics address works
too) and prints the node, its peers, what it holds, the recent pulls, upstream health, pins and
distributions: the same sections as the page. Colour only when asked for (a terminal); a node
that cannot be reached or refuses is one line (`StatusUnavailable`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import aiohttp
from yarl import URL

from mirror.bodies import read_capped
from mirror.errors import MirrorError
from mirror.prefetch.client import NodeRefused, decode_answer, progress_bar

STATUS_PATH = "/mirror/v1/status"
# A report is a few hundred KiB at most (128 pulls, 500 images, 20 distributions).
_MAX_ANSWER = 16 * 1024 * 1024
# The terminal shows this many of the recent pulls, the newest.
PULLS_SHOWN = 20

_RESET = "\033[0m"
_STYLES = {
    "heading": "\033[1m",
    "muted": "\033[2m",
    "local": "\033[32m",
    "held": "\033[32m",
    "ok": "\033[32m",
    "peer": "\033[36m",
    "fetching": "\033[36m",
    "upstream": "\033[33m",
    "waiting": "\033[33m",
    "failed": "\033[31m",
    "error": "\033[31m",
}


class StatusUnavailable(MirrorError):
    """The node could not be reached, refused, or answered something that is no report."""


async def fetch_status(node: URL, *, timeout: float = 10.0) -> dict[str, Any]:
    """The node's report; `StatusUnavailable` with the reason otherwise."""
    url = node.with_path(STATUS_PATH)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url) as response,
        ):
            body = await read_capped(response, _MAX_ANSWER)
            status = response.status
    except (aiohttp.ClientError, TimeoutError, MirrorError) as exc:
        reason = str(exc) or type(exc).__name__
        raise StatusUnavailable(f"cannot reach the node at {node}: {reason}") from exc
    try:
        document = decode_answer(body, status)
    except NodeRefused as exc:
        raise StatusUnavailable(f"the node at {node} {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("node"), dict):
        raise StatusUnavailable(f"the node at {node} answered something that is no status report")
    return document


async def show_status(node: URL, *, as_json: bool, colour: bool) -> str:
    report = await fetch_status(node)
    if as_json:
        return json.dumps(report, indent=2, sort_keys=True)
    return render(report, colour=colour)


# --- rendering ------------------------------------------------------------------------------


def render(report: dict[str, Any], *, colour: bool) -> str:
    """The report as text: a summary of the node, then one table per section."""
    paint = _painter(colour)
    now = _number(report.get("generated_at"))
    parts = [
        _node(report.get("node") or {}, report.get("holdings") or {}, now, paint),
        _peers(_list(report.get("peers")), now, paint),
        _holdings(report.get("holdings") or {}, paint),
        _pulls(_list(report.get("pulls")), now, paint),
        _upstream(_list(report.get("upstream")), now, paint),
        _pins(_list(report.get("pins")), paint),
        _distributions(_list(report.get("distributions")), now, paint),
    ]
    return "\n\n".join(parts)


Paint = Callable[[str, str], str]


def _painter(colour: bool) -> Paint:
    def paint(style: str, text: str) -> str:
        code = _STYLES.get(style)
        return f"{code}{text}{_RESET}" if colour and code and text else text

    return paint


def _node(node: dict[str, Any], holdings: dict[str, Any], now: float, paint: Paint) -> str:
    node_id = node.get("id")
    ident = f"id {str(node_id)[:16]}" if node_id else "alone (no cluster key)"
    first = (
        f"{paint('heading', 'node ' + str(node.get('address')))}  {ident}, "
        f"store {node.get('store')}"
        + (f" (pins in {node['runtime']})" if node.get("runtime") else "")
        + f", {node.get('platform')}, mirror {node.get('version')}, "
        f"up {duration(_number(node.get('uptime_seconds')))}"
    )
    cache = node.get("cache")
    cache_text = "no node cache"
    if isinstance(cache, dict):
        used, bound = cache.get("bytes"), cache.get("max_bytes")
        cache_text = f"cache {size(used)}"
        if isinstance(bound, int) and bound > 0 and isinstance(used, int):
            cache_text += f" of {size(bound)} ({100 * used // bound}%)"
    keys = holdings.get("announced_keys") or {}
    second = (
        f"{cache_text}, announces {keys.get('digest', 0)} digests and {keys.get('tag', 0)} tags"
        f", metrics on {node.get('metrics_addr')}"
    )
    return f"{first}\n{second}"


def _peers(peers: list[dict[str, Any]], now: float, paint: Paint) -> str:
    rows = [
        [
            str(peer.get("address") or "-"),
            str(peer.get("router") or "-"),
            ago(peer.get("last_seen"), now),
            "-" if peer.get("rtt_ms") is None else f"{_number(peer.get('rtt_ms')):.2f} ms",
            "-" if peer.get("uploads") is None else str(peer.get("uploads")),
            f"{size(peer.get('throughput'))}/s" if peer.get("throughput") else "-",
        ]
        for peer in peers
    ]
    headers = ["ADDRESS", "ROUTER", "LAST SEEN", "RTT", "UPLOADS", "THROUGHPUT"]
    return _section(f"PEERS ({len(peers)})", headers, rows, paint, right={2, 3, 4, 5})


def _holdings(holdings: dict[str, Any], paint: Paint) -> str:
    images = _list(holdings.get("images"))
    rows = [
        [str(image.get("ref")), short_digest(image.get("digest")), size(image.get("size"))]
        for image in images
    ]
    total = holdings.get("images_total", len(images))
    title = f"HOLDINGS ({total} image{'' if total == 1 else 's'})"
    if holdings.get("error"):
        title += " " + paint("error", f"store error: {holdings['error']}")
    return _section(title, ["IMAGE", "DIGEST", "SIZE"], rows, paint, right={2})


def _pulls(pulls: list[dict[str, Any]], now: float, paint: Paint) -> str:
    shown = pulls[:PULLS_SHOWN]
    rows = []
    styles = []
    for pull in shown:
        status = pull.get("status")
        rows.append(
            [
                ago(pull.get("at"), now),
                f"{pull.get('method')} {pull.get('kind')}",
                str(pull.get("ref") or pull.get("digest") or "-"),
                str(pull.get("source")),
                str(pull.get("peer") or ""),
                str(status),
                size(pull.get("bytes")),
                seconds(pull.get("seconds")),
            ]
        )
        failed = isinstance(status, int) and status >= 400
        styles.append({3: str(pull.get("source")), 5: "error" if failed else ""})
    title = f"RECENT PULLS (last {len(shown)} of {len(pulls)})" if pulls else "RECENT PULLS"
    headers = ["WHEN", "REQUEST", "REF", "SOURCE", "PEER", "STATUS", "BYTES", "TIME"]
    return _section(title, headers, rows, paint, right={0, 5, 6, 7}, styles=styles)


def _upstream(entries: list[dict[str, Any]], now: float, paint: Paint) -> str:
    rows = [
        [
            str(entry.get("registry")),
            "ok" if entry.get("healthy") else "failing",
            ago(entry.get("last_success"), now),
            ago(entry.get("last_error"), now),
            str(entry.get("error") or ""),
        ]
        for entry in entries
    ]
    styles = [{1: "ok" if entry.get("healthy") else "error", 4: "error"} for entry in entries]
    headers = ["REGISTRY", "HEALTH", "LAST SUCCESS", "LAST ERROR", "ERROR"]
    return _section("UPSTREAM", headers, rows, paint, right={2, 3}, styles=styles)


def _pins(pins: list[dict[str, Any]], paint: Paint) -> str:
    rows = []
    for pin in pins:
        amount, layers = pin.get("bytes") or {}, pin.get("layers") or {}
        rows.append(
            [
                str(pin.get("ref")),
                str(pin.get("state")),
                progress_bar(amount.get("done"), amount.get("total")),
                f"{layers.get('done', 0)}/{layers.get('total', 0)}",
                str(pin.get("error") or ""),
            ]
        )
    styles = [{1: str(pin.get("state")), 4: "error"} for pin in pins]
    headers = ["IMAGE", "STATE", "PROGRESS", "LAYERS", "ERROR"]
    return _section(f"PINS ({len(pins)})", headers, rows, paint, right={3}, styles=styles)


def _distributions(items: list[dict[str, Any]], now: float, paint: Paint) -> str:
    rows = []
    for item in items:
        nodes = item.get("nodes") or {}
        done = total = 0
        for progress in (item.get("by_node") or {}).values():
            amount = progress.get("bytes") or {} if isinstance(progress, dict) else {}
            done += amount.get("done") or 0
            total += amount.get("total") or 0
        held = f"{nodes.get('done', 0)}/{nodes.get('total', 0)} held"
        if nodes.get("failed"):
            held += f", {nodes['failed']} failed"
        rows.append(
            [
                str(item.get("ref")),
                "complete" if item.get("complete") else "under way",
                held,
                progress_bar(done, total),
                ago(item.get("started"), now),
            ]
        )
    headers = ["IMAGE", "STATE", "NODES", "BYTES", "STARTED"]
    title = f"DISTRIBUTIONS ({len(items)})"
    return _section(title, headers, rows, paint, right={4})


def _section(
    title: str,
    headers: list[str],
    rows: list[list[str]],
    paint: Paint,
    *,
    right: AbstractSet[int] = frozenset(),
    styles: Sequence[dict[int, str]] = (),
) -> str:
    """A title and an aligned table (widths from the plain text, colour added after)."""
    lines = [paint("heading", title)]
    if not rows:
        lines.append(paint("muted", "  (none)"))
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str], style: dict[int, str]) -> str:
        out = []
        for index, cell in enumerate(cells):
            padding = " " * (widths[index] - len(cell))
            text = paint(style.get(index, ""), cell)  # the padding stays outside the colour
            out.append(padding + text if index in right else text + padding)
        return "  " + "  ".join(out).rstrip()

    lines.append(paint("muted", line(headers, {})))
    for index, row in enumerate(rows):
        lines.append(line(row, styles[index] if index < len(styles) else {}))
    return "\n".join(lines)


# --- formatting -----------------------------------------------------------------------------


def size(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    amount, unit = float(value), 0
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while amount >= 1024 and unit < len(units) - 1:
        amount /= 1024
        unit += 1
    return f"{int(amount)} B" if unit == 0 else f"{amount:.1f} {units[unit]}"


def seconds(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s" if value < 120 else duration(value)


def duration(value: float) -> str:
    total = max(0, int(value))
    days, hours = total // 86400, total % 86400 // 3600
    minutes, rest = total % 3600 // 60, total % 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {rest}s"
    return f"{rest}s"


def ago(at: object, now: float) -> str:
    if not isinstance(at, int | float) or isinstance(at, bool):
        return "never"
    return f"{duration(now - at)} ago"


def short_digest(digest: object) -> str:
    if not isinstance(digest, str) or ":" not in digest:
        return "-"
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}:{hexpart[:12]}"


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _list(value: object) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []
