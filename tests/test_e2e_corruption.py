"""A cached blob rots on disk while its node is stopped: what the cluster does about it.

Real `mirror run` processes on distinct loopback addresses, a real distribution registry as the
upstream. Node A fetches a blob into its cache; a byte of the cached file is flipped while A is
stopped. Node B's runtime pulls it through B: B streams from A, sees the digest fail, cuts its
client and reports to A, which re-hashes and evicts; B's next pull is whole and byte-identical.
Alone, a node finds the same rot with its scrub when it starts.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from harness.cluster import HOSTS, keygen, status_of, wait_until
from harness.mirror_node import MirrorNode
from harness.net import free_udp_port
from harness.registry import Registry

BLOB_SIZE = 6 * 1024 * 1024
REPO = "corrupt/app"


def push_blob(registry: Registry, data: bytes) -> str:
    """Upload one blob to the registry (monolithic upload), as a push of a layer does."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = urllib.request.Request(f"{registry.url}/v2/{REPO}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(start, timeout=10) as response:
        location = urllib.parse.urljoin(registry.url, response.headers["Location"])
    separator = "&" if "?" in location else "?"
    put = urllib.request.Request(
        f"{location}{separator}digest={urllib.parse.quote(digest)}",
        data=data,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(put, timeout=30) as response:
        assert response.status == 201
    return digest


def blob_url(node: MirrorNode, registry: Registry, digest: str) -> str:
    ns = urllib.parse.quote(registry.host, safe="")
    return f"{node.url}/v2/{REPO}/blobs/{digest}?ns={ns}"


def pull(url: str) -> tuple[bytes, BaseException | None]:
    """What a runtime's GET receives: the body so far, and how the transfer ended."""
    received = bytearray()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read1(1024 * 1024):
                received += chunk
            if response.length:  # fewer bytes than Content-Length, yet no error
                raise http.client.IncompleteRead(bytes(received), response.length)
    except (http.client.HTTPException, OSError) as exc:
        return bytes(received), exc
    return bytes(received), None


def flip_a_byte(path: Path, at: int) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as handle:
        handle.seek(at)
        byte = handle.read(1)
        handle.seek(at)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.chmod(path, 0o444)


def cached_file(node_dir: Path, digest: str) -> Path:
    algorithm, hex_ = digest.split(":")
    return node_dir / "cache" / "blobs" / algorithm / hex_


def restart(node: MirrorNode) -> None:
    """Start the same process again: same flags, ports, cache directory and node id."""
    node.process.start()

    def ready() -> bool:
        node.process.ensure_running()
        try:
            return status_of(f"{node.url}/readyz") == 200
        except OSError:
            return False

    wait_until(ready, f"{node.address} to be ready again")


def test_a_rotten_blob_is_cut_reported_evicted_and_fetched_again(
    tmp_path: Path,
    registry: Registry,
    mirror_factory: Callable[..., MirrorNode],
) -> None:
    data = os.urandom(BLOB_SIZE)
    digest = push_blob(registry, data)
    key_file = tmp_path / "cluster.key"
    keygen(key_file)
    routers = [f"{host}:{free_udp_port(host)}" for host in HOSTS[:2]]

    def start(index: int, *extra: str) -> MirrorNode:
        return mirror_factory(
            "--store=cache",
            f"--cluster-key-file={key_file}",
            f"--router-addr={routers[index]}",
            f"--bootstrap=static:{','.join(routers)}",
            "--resolve-timeout=200ms",
            f"--upstream={registry.host}=http://{registry.host}",
            *extra,
            host=HOSTS[index],
        )

    # A's scrub is off: the peer's report alone must find and evict the rot.
    node_a = start(0, "--scrub-rate=0")
    node_b = start(1)
    node_a_dir = tmp_path / "mirror0"
    assert pull(blob_url(node_a, registry, digest)) == (data, None)
    cached = cached_file(node_a_dir, digest)
    wait_until(cached.exists, "A to cache the blob")

    node_a.stop()
    flip_a_byte(cached, BLOB_SIZE // 2)
    restart(node_a)

    # B must find A as the blob's provider; with the upstream away, a HEAD can only be
    # answered by A (and B fetches nothing into its own cache meanwhile).
    registry.stop()
    url_b = blob_url(node_b, registry, digest)
    wait_until(lambda: status_of(url_b) == 200, "B to find A's copy")
    registry.start()

    received, ended = pull(url_b)
    assert ended is not None, "the wrong bytes were handed out as a complete body"
    # Everything but the held-back last chunk may have gone out, the flipped byte included:
    # what matters is that the client can never take it for the whole blob.
    assert len(received) < len(data)
    flipped = BLOB_SIZE // 2
    assert received[:flipped] == data[:flipped]

    wait_until(
        lambda: node_a.metric("mirror_corrupt_blobs_total", source="report", action="evicted") == 1,
        "A to re-hash and evict its copy",
    )
    assert not cached.exists()
    assert node_a.metric("mirror_corruption_reports_received_total", outcome="queued") == 1
    assert node_a.metric("mirror_verified_blobs_total", source="report") == 1
    assert node_b.metric("mirror_corruption_reports_sent_total", result="accepted") == 1
    assert node_b.metric("mirror_peer_fetch_failures_total", reason="digest-mismatch") == 1

    assert pull(url_b) == (data, None)
    # ...and A, asked by its own runtime, fetches a good copy again rather than the rot.
    assert pull(blob_url(node_a, registry, digest)) == (data, None)


def test_a_node_alone_finds_the_rot_with_its_scrub_at_start(
    registry: Registry,
    mirror_factory: Callable[..., MirrorNode],
    tmp_path: Path,
) -> None:
    data = os.urandom(BLOB_SIZE)
    digest = push_blob(registry, data)
    node = mirror_factory("--store=cache", f"--upstream={registry.host}=http://{registry.host}")
    url = blob_url(node, registry, digest)
    assert pull(url) == (data, None)
    cached = cached_file(tmp_path / "mirror0", digest)
    wait_until(cached.exists, "the blob to be cached")
    node.stop()
    flip_a_byte(cached, 0)
    restart(node)

    wait_until(
        lambda: node.metric("mirror_corrupt_blobs_total", source="scrub", action="evicted") == 1,
        "the scrub to evict the rotten copy",
    )
    assert node.metric("mirror_verified_bytes_total", source="scrub") == BLOB_SIZE
    assert pull(url) == (data, None)
    registry.sync_access_log()
    assert registry.blob_fetch_count(digest) == 2, "the good copy did not come from upstream"
