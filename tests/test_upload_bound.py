"""The holder's side of spreading the load: at most `--max-uploads` blob bodies go to peers.

The real registry front on loopback, with the real access policy and signature checks, on a
node cache. A peer download is held open by a client that reads its headers and then nothing,
through a receive buffer far smaller than the blob, so the holder's send blocks and the upload
stays in flight for as long as the test wants it to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from mirror.cli import build_parser, run_config
from mirror.clusterkey import ClusterKey
from mirror.config import DEFAULT_BLOB_FANOUT, DEFAULT_MAX_UPLOADS
from mirror.content.service import ContentPolicy, ContentService
from mirror.metrics import Metrics
from mirror.oci import mediatypes as mt
from mirror.oci.reference import parse_digest
from mirror.peers.auth import PEER_HEADER, RequestSigner, RequestVerifier
from mirror.peers.fetcher import LAST_RESORT_PARAM, UPLOADS_HEADER
from mirror.peers.referrals import SHARER_PARAM, TRY_HEADER, describe, with_sharer
from mirror.registry.access import AccessPolicy
from mirror.registry.api import RegistryApi
from mirror.routing.router import Provider
from mirror.stores.cache import CacheStore

KEY = ClusterKey.from_text(ClusterKey.generate())
POLICY = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=1.0)
# Far more than the holder's send buffer (4 MiB at most here) and the stalled reader's together.
BIG = 16 * 1024 * 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Holder:
    host: str
    port: int
    http: ClientSession
    metrics: Metrics
    blob: bytes
    blob_path: str
    manifest_path: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def signed(self, method: str, path: str) -> dict[str, str]:
        return {PEER_HEADER: RequestSigner(KEY).sign(method, path)}

    def sample(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0


@contextlib.asynccontextmanager
async def holding(
    tmp_path: Path,
    max_uploads: int,
    blob_fanout: int = 0,
    known_providers: Callable[[str], list[str]] = lambda digest: [],
) -> AsyncIterator[Holder]:
    """A node on its cache holding one big blob and a manifest, bounded to `max_uploads`."""
    metrics = Metrics()
    store = CacheStore(tmp_path / "cache", metrics=metrics)
    await store.start()
    blob = os.urandom(BIG)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.DOCKER_MANIFEST,
            "config": {"digest": sha(b"{}"), "size": 2},
            "layers": [{"digest": sha(blob), "size": len(blob)}],
        }
    ).encode()
    for data in (blob, manifest):
        await store.put(parse_digest(sha(data)), data)
    access = AccessPolicy(allowed_clients=(), verifier=RequestVerifier(KEY))
    api = RegistryApi(
        metrics,
        ContentService(store, metrics, POLICY),
        access=access,
        max_uploads=max_uploads,
        blob_fanout=blob_fanout,
        known_providers=known_providers,
    )
    server = TestServer(api.app(), host="127.0.0.1")
    await server.start_server()
    assert server.port is not None
    try:
        async with ClientSession() as http:
            yield Holder(
                "127.0.0.1",
                server.port,
                http,
                metrics,
                blob,
                f"/v2/app/blobs/{sha(blob)}?ns=docker.io",
                f"/v2/app/manifests/{sha(manifest)}?ns=docker.io",
            )
    finally:
        await server.close()
        await store.close()


@contextlib.asynccontextmanager
async def stalled_download(holder: Holder, path: str) -> AsyncIterator[bytes]:
    """A signed peer GET whose body is never read: the upload stays in flight until exit.

    Yields the response head. A small receive buffer (which also turns off autotuning) keeps
    what the holder can push into the connection far below the blob's size.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    writer: asyncio.StreamWriter | None = None
    try:
        await asyncio.get_running_loop().sock_connect(sock, (holder.host, holder.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        signature = holder.signed("GET", path)[PEER_HEADER]
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {holder.host}:{holder.port}\r\n"
            f"{PEER_HEADER}: {signature}\r\n\r\n".encode()
        )
        yield await reader.readuntil(b"\r\n\r\n")
    finally:
        if writer is not None:
            writer.transport.abort()
        else:
            sock.close()


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` against a deadline (the holder notices a closed client on its own)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def read(
    holder: Holder, method: str, path: str, *, signed: bool
) -> tuple[int, dict[str, str], bytes]:
    headers = holder.signed(method, path) if signed else {}
    async with holder.http.request(method, holder.url + path, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def test_past_the_bound_a_peer_gets_a_quick_429_and_the_runtime_is_served(
    tmp_path: Path,
) -> None:
    async with holding(tmp_path, max_uploads=1) as holder:
        async with stalled_download(holder, holder.blob_path) as head:
            assert head.startswith(b"HTTP/1.1 200 ")
            assert f"{UPLOADS_HEADER}: 1\r\n".encode() in head
            assert holder.sample("mirror_peer_uploads") == 1

            status, headers, body = await read(holder, "GET", holder.blob_path, signed=True)
            assert status == 429
            assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
            assert headers["Retry-After"] == "1"
            assert headers[UPLOADS_HEADER] == "1"
            assert holder.sample("mirror_peer_uploads_refused_total") == 1

            # The node's own runtime is never refused, nor counted, nor told the load.
            status, headers, body = await read(holder, "GET", holder.blob_path, signed=False)
            assert status == 200 and body == holder.blob
            assert UPLOADS_HEADER not in headers

            # Manifests and HEADs cost no upload: served, and they carry the load for free.
            for method, path in (("HEAD", holder.blob_path), ("GET", holder.manifest_path)):
                status, headers, _ = await read(holder, method, path, signed=True)
                assert status == 200, (method, path)
                assert headers[UPLOADS_HEADER] == "1"

            # A last resort (every holder its fetcher found was busy) is served past the bound.
            last_resort = f"{holder.blob_path}&{LAST_RESORT_PARAM}=1"
            status, headers, body = await read(holder, "GET", last_resort, signed=True)
            assert status == 200 and body == holder.blob
            assert headers[UPLOADS_HEADER] == "2"
            assert holder.sample("mirror_peer_uploads_refused_total") == 1
            # ...and nobody on the way can add the flag to a peer's request: it is signed.
            headers = holder.signed("GET", holder.blob_path)
            async with holder.http.get(holder.url + last_resort, headers=headers) as response:
                assert response.status == 401

        await eventually(
            lambda: holder.sample("mirror_peer_uploads") == 0, "the stalled upload to end"
        )
        status, _, body = await read(holder, "GET", holder.blob_path, signed=True)
        assert status == 200 and body == holder.blob


async def test_no_bound_with_zero(tmp_path: Path) -> None:
    async with holding(tmp_path, max_uploads=0) as holder:
        async with (
            stalled_download(holder, holder.blob_path),
            stalled_download(holder, holder.blob_path),
        ):
            assert holder.sample("mirror_peer_uploads") == 2
            status, _, body = await read(holder, "GET", holder.blob_path, signed=True)
            assert status == 200 and body == holder.blob
        assert holder.sample("mirror_peer_uploads_refused_total") == 0


def as_sharer(path: str, index: int) -> tuple[str, str]:
    """`path` asked by sharer number `index`, and how a referral names that sharer."""
    sharer = Provider(bytes([index]) * 20, f"10.0.0.{index}:5000")
    return with_sharer(path, sharer), describe(sharer)


async def test_past_the_fanout_a_sharer_is_referred_to_the_sharers_fetching_the_blob(
    tmp_path: Path,
) -> None:
    async with holding(tmp_path, max_uploads=8, blob_fanout=1) as holder:
        first_path, first = as_sharer(holder.blob_path, 1)
        second_path, second = as_sharer(holder.blob_path, 2)
        async with stalled_download(holder, first_path) as head:
            assert head.startswith(b"HTTP/1.1 200 ")
            # Another sharer is referred to the first at once; a fetcher that is none after
            # it to that sharer first (the chain's far end, as far as the holder knows).
            expected = {second_path: first, holder.blob_path: f"{second}, {first}"}
            for path, named in expected.items():
                status, headers, body = await read(holder, "GET", path, signed=True)
                assert status == 429, path
                assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
                assert headers[TRY_HEADER] == named
            assert holder.sample("mirror_peer_uploads_referred_total") == 2
            assert holder.sample("mirror_peer_uploads_refused_total") == 0
            # The first sharer resuming is not referred to itself; a last resort is served.
            status, _, body = await read(holder, "GET", first_path, signed=True)
            assert status == 200 and body == holder.blob
            last_resort = f"{second_path}&{LAST_RESORT_PARAM}=1"
            status, _, body = await read(holder, "GET", last_resort, signed=True)
            assert status == 200 and body == holder.blob
            # Another blob, the runtime and a malformed sharer parameter are not bound by it.
            status, _, _ = await read(holder, "GET", holder.manifest_path, signed=True)
            assert status == 200
            status, _, body = await read(holder, "GET", holder.blob_path, signed=False)
            assert status == 200 and body == holder.blob
            bad = f"{holder.blob_path}&{SHARER_PARAM}=not-a-node"
            status, headers, _ = await read(holder, "GET", bad, signed=True)
            assert status == 429 and headers[TRY_HEADER] == f"{second}, {first}"
            # The two sharers referred last are named, newest first, never to themselves.
            third_path, third = as_sharer(holder.blob_path, 3)
            fourth_path, fourth = as_sharer(holder.blob_path, 4)
            expected = {
                third_path: f"{second}, {first}",
                fourth_path: f"{third}, {second}, {first}",
                third_path + "&again": f"{fourth}, {first}",
                holder.blob_path: f"{third}, {fourth}, {first}",
            }
            for path, named in expected.items():
                status, headers, _ = await read(holder, "GET", path, signed=True)
                assert status == 429 and headers[TRY_HEADER] == named, path
            # Two sharers at once (the second a last resort): both named after the referred
            # ones, the newest first.
            async with stalled_download(holder, last_resort):
                status, headers, _ = await read(holder, "GET", holder.blob_path, signed=True)
                assert status == 429
                assert headers[TRY_HEADER] == f"{third}, {fourth}, {second}, {first}"
        await eventually(
            lambda: holder.sample("mirror_peer_uploads") == 0, "the stalled uploads to end"
        )
        status, _, body = await read(holder, "GET", second_path, signed=True)
        assert status == 200 and body == holder.blob
        # Forgotten with the uploads: a new chain's referral names only its own sharers.
        async with stalled_download(holder, fourth_path):
            status, headers, _ = await read(holder, "GET", holder.blob_path, signed=True)
            assert status == 429 and headers[TRY_HEADER] == fourth


async def test_past_a_fanout_of_two_a_sharer_is_referred_down_the_tree(tmp_path: Path) -> None:
    """A tree fills level by level: a late sharer is sent to one of the holder's own sharers,
    a different one first each time, and the far end comes after them."""
    async with holding(tmp_path, max_uploads=8, blob_fanout=2) as holder:
        first_path, first = as_sharer(holder.blob_path, 1)
        second_path, second = as_sharer(holder.blob_path, 2)
        third_path, third = as_sharer(holder.blob_path, 3)
        fourth_path, fourth = as_sharer(holder.blob_path, 4)
        async with (
            stalled_download(holder, first_path) as head_1,
            stalled_download(holder, second_path) as head_2,
        ):
            assert head_1.startswith(b"HTTP/1.1 200 ") and head_2.startswith(b"HTTP/1.1 200 ")
            expected = [
                (third_path, f"{first}, {second}"),
                (fourth_path, f"{second}, {first}, {third}"),
                (third_path, f"{first}, {second}, {fourth}"),
                (holder.blob_path, f"{second}, {first}, {third}, {fourth}"),
            ]
            for path, named in expected:
                status, headers, _ = await read(holder, "GET", path, signed=True)
                assert status == 429 and headers[TRY_HEADER] == named, path
            # A sharer already fetching is served: it is one of the tree's, not a newcomer.
            status, _, body = await read(holder, "GET", first_path, signed=True)
            assert status == 200 and body == holder.blob
            assert holder.sample("mirror_peer_uploads_referred_total") == 4
        await eventually(
            lambda: holder.sample("mirror_peer_uploads") == 0, "the stalled uploads to end"
        )
        # Forgotten with the uploads: a new tree starts at the holder.
        status, _, body = await read(holder, "GET", third_path, signed=True)
        assert status == 200 and body == holder.blob


async def test_past_the_bound_the_root_of_a_blobs_tree_is_taken_and_the_next_referred_to_it(
    tmp_path: Path,
) -> None:
    """A blob that only this holder provides gets the root of its tree even past the bound:
    refused with nobody to name, its fetchers would all end at a last resort here at once
    (docs/benchmarks.md). The fetchers after the root are referred to it."""
    async with holding(tmp_path, max_uploads=1, blob_fanout=2) as holder:
        first_path, first = as_sharer(holder.blob_path, 1)
        second_path, second = as_sharer(holder.blob_path, 2)
        async with stalled_download(holder, holder.blob_path) as head:
            assert head.startswith(b"HTTP/1.1 200 ")  # a peer that is no sharer: the bound
            async with stalled_download(holder, first_path) as head_1:
                assert head_1.startswith(b"HTTP/1.1 200 ")
                assert f"{UPLOADS_HEADER}: 2\r\n".encode() in head_1
                # Past the bound, the next sharer goes to the root, and so does a peer that
                # is none (after the sharer referred last, as at the fan-out).
                expected = ((second_path, first), (holder.blob_path, f"{first}, {second}"))
                for path, named in expected:
                    status, headers, body = await read(holder, "GET", path, signed=True)
                    assert status == 429, path
                    assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
                    assert headers[TRY_HEADER] == named
                    assert headers["Retry-After"] == "1"
                assert holder.sample("mirror_peer_uploads_referred_total") == 2
                assert holder.sample("mirror_peer_uploads_refused_total") == 0
                # The root resuming is one of the tree's: served, not referred to itself.
                status, _, body = await read(holder, "GET", first_path, signed=True)
                assert status == 200 and body == holder.blob
            await eventually(
                lambda: holder.sample("mirror_peer_uploads") == 1, "the root's upload to end"
            )
            # With no root left, a peer that is no sharer has nobody to be referred to: refused
            # (to ask another holder); a sharer is the blob's new root.
            status, headers, _ = await read(holder, "GET", holder.blob_path, signed=True)
            assert status == 429 and TRY_HEADER not in headers
            assert holder.sample("mirror_peer_uploads_refused_total") == 1
            status, _, body = await read(holder, "GET", second_path, signed=True)
            assert status == 200 and body == holder.blob


async def test_past_the_bound_a_sharer_goes_to_another_provider_of_the_blob(
    tmp_path: Path,
) -> None:
    """Another node provides the blob (this holder's own records say so): past the bound even
    its first sharer is refused, to go there. The asker's own record does not count."""
    known = [(bytes([1]) * 20).hex()]  # the asker, sharer number 1 (as_sharer)
    async with holding(
        tmp_path, max_uploads=1, blob_fanout=2, known_providers=lambda digest: known
    ) as holder:
        path, _ = as_sharer(holder.blob_path, 1)
        async with stalled_download(holder, holder.blob_path):
            status, _, body = await read(holder, "GET", path, signed=True)
            assert status == 200 and body == holder.blob, "only the asker provides it: a root"
            known.append((bytes([9]) * 20).hex())
            status, headers, _ = await read(holder, "GET", path, signed=True)
            assert status == 429 and TRY_HEADER not in headers
            assert holder.sample("mirror_peer_uploads_refused_total") == 1


def test_the_bound_comes_from_the_flag_and_the_environment() -> None:
    def max_uploads(*argv: str, environ: dict[str, str] | None = None) -> int:
        args = build_parser(environ or {}).parse_args(["run", *argv])
        return run_config(args).routing.max_uploads

    assert max_uploads() == DEFAULT_MAX_UPLOADS == 8
    assert max_uploads("--max-uploads=2") == 2
    assert max_uploads(environ={"MIRROR_MAX_UPLOADS": "0"}) == 0
    for bad in ("-1", "many", "1.5", "²"):
        for flag in ("--max-uploads", "--blob-fanout"):
            with pytest.raises(SystemExit):
                build_parser({}).parse_args(["run", f"{flag}={bad}"])

    def blob_fanout(*argv: str) -> int:
        return run_config(build_parser({}).parse_args(["run", *argv])).routing.blob_fanout

    assert blob_fanout() == DEFAULT_BLOB_FANOUT == 2
    assert blob_fanout("--blob-fanout=0") == 0
