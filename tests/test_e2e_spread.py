"""Spreading the load with real nodes: a holder at its upload bound sends fetchers elsewhere.

Three `mirror run` processes of one keyed cluster, on their node caches, on distinct loopback
addresses: nodes 1 and 2 hold the same blobs, node 3 holds nothing and fetches through its
mirror. Node 1 runs with `--max-uploads=1` and is kept busy by one slow peer download (a signed
GET whose body is never read). Node 3's fetches that ask node 1 first are refused at once and
served by node 2: no wait on the busy holder, no last resort, no upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.cluster import HOSTS, keygen, status_of, wait_until
from harness.mirror_node import MirrorNode
from harness.net import free_udp_port

from mirror.clusterkey import ClusterKey
from mirror.oci.reference import Digest, parse_digest
from mirror.peers.auth import PEER_HEADER, RequestSigner
from mirror.peers.fetcher import UPLOADS_HEADER
from mirror.stores.cache import CacheStore

# Far more than the holder's send buffer and the stalled reader's receive buffer together.
BIG = 16 * 1024 * 1024
# Blobs node 3 fetches one after the other until one asked the busy node first. Providers
# nothing is known about are ordered at random, so each fetch does with probability 1/2.
POOL = 24


def digest_of(data: bytes) -> Digest:
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


def fill_caches(directories: list[Path], blobs: list[bytes]) -> None:
    async def fill(directory: Path) -> None:
        cache = CacheStore(directory)
        await cache.start()
        try:
            for data in blobs:
                await cache.put(digest_of(data), data)
        finally:
            await cache.close()

    for directory in directories:
        asyncio.run(fill(directory))


@contextmanager
def stalled_download(node: MirrorNode, path: str, key: ClusterKey) -> Iterator[bytes]:
    """A signed peer GET of `path` at `node` whose body is never read; yields the head."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # A small receive buffer (it also turns autotuning off) holds the holder's send.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.settimeout(10)
        sock.connect((node.host, node.port))
        signature = RequestSigner(key).sign("GET", path)
        head = f"GET {path} HTTP/1.1\r\nHost: {node.address}\r\n{PEER_HEADER}: {signature}\r\n"
        sock.sendall(head.encode() + b"\r\n")
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(4096)
            assert chunk, "the holder closed the connection"
            received += chunk
        yield received.split(b"\r\n\r\n", 1)[0]


def fetch(node: MirrorNode, digest: Digest) -> bytes:
    with urllib.request.urlopen(f"{node.url}/v2/spread/app/blobs/{digest}", timeout=30) as answer:
        return bytes(answer.read())


def test_a_busy_holder_sends_a_fetcher_to_another_provider(
    tmp_path: Path, mirror_factory: Callable[..., MirrorNode]
) -> None:
    key_file = tmp_path / "cluster.key"
    keygen(key_file)
    key = ClusterKey.load(key_file)
    big = os.urandom(BIG)
    pool = [os.urandom(1024 * 1024) for _ in range(POOL)]
    caches = [tmp_path / f"cache{index}" for index in range(3)]
    fill_caches(caches[:2], [big, *pool])
    routers = [f"{host}:{free_udp_port(host)}" for host in HOSTS[:3]]

    def start(index: int, *extra: str) -> MirrorNode:
        return mirror_factory(
            "--store=cache",
            f"--cache-dir={caches[index]}",
            f"--cluster-key-file={key_file}",
            f"--router-addr={routers[index]}",
            f"--bootstrap=static:{','.join(routers)}",
            "--resolve-timeout=200ms",
            "--upstream-fallback=false",
            *extra,
            host=HOSTS[index],
        )

    busy, idle = start(0, "--max-uploads=1"), start(1, "--max-uploads=1")
    fetcher = start(2)
    for node in (busy, idle):
        wait_until(
            lambda node=node: node.metric("mirror_advertised_keys", kind="digest") >= POOL + 1,
            f"{node.address} to announce its blobs",
        )
    for node in (busy, idle, fetcher):
        wait_until(lambda node=node: node.metric("mirror_dht_contacts") >= 2, "the cluster")
    for data in pool:
        url = f"{fetcher.url}/v2/spread/app/blobs/{digest_of(data)}"
        wait_until(lambda url=url: status_of(url) == 200, f"{url} to be found")

    with stalled_download(busy, f"/v2/spread/app/blobs/{digest_of(big)}", key) as head:
        assert head.startswith(b"HTTP/1.1 200 ")
        assert f"{UPLOADS_HEADER}: 1".encode() in head
        wait_until(lambda: busy.metric("mirror_peer_uploads") == 1, "the slow upload")

        steered: Digest | None = None
        for data in pool:
            digest = digest_of(data)
            assert fetch(fetcher, digest) == data
            if busy.metric("mirror_peer_uploads_refused_total") >= 1:
                steered = digest
                break
        assert steered is not None, "the busy holder was never asked first"

        # Refused at once, the fetch went straight to the other holder: no last resort.
        assert busy.metric("mirror_peer_uploads_refused_total") == 1
        assert busy.metric("mirror_peer_uploads") == 1
        assert fetcher.metric("mirror_peer_fetches_steered_total") == 1
        assert fetcher.metric("mirror_peer_last_resort_fetches_total") == 0
        assert fetcher.metric("mirror_peer_fetch_failures_total", reason="unavailable") == 0
        log = fetcher.process.log_text()
        assert re.search(rf"peer {re.escape(busy.address)} is busy", log), log[-3000:]
        served_by = re.findall(rf"streaming {re.escape(str(steered))} from (\S+)", log)
        assert served_by == [idle.address], log[-3000:]
