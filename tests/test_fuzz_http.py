"""Fuzzing the registry port of a real `mirror run` node: no 5xx, no traceback, node unharmed.

Requests are built from a seeded generator (so a failure reproduces: the seed is in the test
id) by mutating valid pull requests: names, references and digests, the `ns`, `n` and `last`
query parameters, `Range` and `X-Mirror-Peer` headers (some signed with the real cluster key,
so the peer path sees the same garbage), lengths far past any limit and digits that are digits
only to `str.isdigit` (superscript and Arabic-Indic ones). They go out as raw bytes over
sockets, since no HTTP client would send most of them. The upstream is a real distribution
registry holding a test image, so mutations of valid requests reach deep into the content path.
"""

from __future__ import annotations

import random
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from harness.cluster import keygen
from harness.images import TestImages
from harness.mirror_node import start_mirror
from harness.net import free_port, free_udp_port
from harness.registry import Registry

from mirror.clusterkey import ClusterKey
from mirror.peers.auth import PEER_HEADER, RequestSigner, UrlSigner, carries_url_signature
from mirror.peers.fetcher import REPORT_PATH_PREFIX

REQUESTS_PER_SEED = 400
SIGNED_URL_PARAMS = ["mirror-sig", "mirror-expires", "mirror-nonce"]
SEEDS = [1, 2, 3]
WEBHOOK_TOKEN = "fuzz-webhook-token-0123456789"
# Webhook bodies: a registry envelope, Harbor's and Docker Hub's shapes, good and twisted.
EVENT_BODIES = [
    '{"events": [{"action": "push", "target": {"mediaType": '
    '"application/vnd.oci.image.manifest.v1+json", "repository": "fuzz/app", "tag": "v1", '
    '"digest": "sha256:' + "a" * 64 + '"}, "request": {"host": "registry.test"}}]}',
    '{"events": [{"action": "push", "target": {"repository": "\u00b2", "tag": 5}}]}',
    '{"events": "no"}',
    '{"type": "PUSH_ARTIFACT", "event_data": {"resources": [{"tag": "v1", "digest": "x", '
    '"resource_url": "h.example.com/a/b:v1"}], "repository": {"repo_full_name": "a/b"}}}',
    '{"type": "PUSH_ARTIFACT", "event_data": {"resources": [[]], "repository": 1}}',
    '{"push_data": {"tag": "latest"}, "repository": {"repo_name": "library/x"}}',
    '{"push_data": {"tag": "../.."}, "repository": {"repo_name": "A B"}}',
    '{"state": "held", "bytes_done": -1}',
    '{"ref": "registry.test/fuzz/app:v1"}',
]
# Bodies for POST /mirror/v1/prefetch and /mirror/v1/measure: good and bad references, wrong
# shapes, not JSON at all.
PREFETCH_BODIES = [
    '{"ref": "registry.test/fuzz/app:v1"}',
    '{"ref": "docker.io/library/x:1", "source": "registry.test/fuzz/app:v1"}',
    '{"ref": "\u00b2"}',
    '{"ref": "a" }',
    '{"ref": 5}',
    '{"ref": "x:1", "source": []}',
    '{"ref": "x:1", "extra": 1}',
    "[]",
    "null",
    '{"ref": "' + "a" * 5000 + '"}',
    '{"ref": "x@sha256:zz"}',
    "\udcff\udcfe",
    "{",
    "",
]
REPO = "fuzz/app"

NASTY = [
    "",
    "a",
    "A",
    "..",
    "%2e%2e",
    "%2F",
    "%00",
    "\u00b2",
    "\u0661\u0662",
    "\uff11",
    "\u00e9",
    "\U0001f600",
    "-1",
    "0",
    "9" * 20,
    "9" * 400,
    "9" * 5000,
    "a" * 300,
    "x" * 5000,
    "sha256:" + "0" * 64,
    "sha256:" + "\u00b2" * 64,
    "sha256:" + "g" * 64,
    "sha512:" + "0" * 128,
    "md5:" + "0" * 32,
    "sha256:",
    ":",
    "localhost:99999",
    "[::1",
    "[::1]:5000",
    "registry.test:5000",
    "tags",
    "list",
    "manifests",
    "blobs",
    "\t",
    " ",
]

RANGES = [
    "bytes=0-0",
    "bytes=0-",
    "bytes=-1",
    "bytes=-0",
    "bytes=5-1",
    "bytes=0-1,2-3",
    "bytes=\u00b2-",
    "bytes=" + "9" * 5000 + "-",
    "bytes=0-" + "9" * 400,
    "bytes=-" + "9" * 30,
    "items=0-1",
    "bytes=\uff10-\uff11",
    "bytes=",
]


@dataclass
class Target:
    host: str
    port: int
    signer: RequestSigner
    url_signer: UrlSigner  # signs URLs as a peer redirecting its runtime here would
    paths: list[str]
    metrics_port: int = 0  # the status page, the report and measure are reachable there too


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, test_images: TestImages) -> Iterator[Target]:
    base = tmp_path_factory.mktemp("fuzz")
    registry = Registry(base / "registry")
    registry.start()
    node = None
    try:
        image = test_images.multi_layer
        image.push(registry.host, REPO)
        key_file = base / "cluster.key"
        keygen(key_file)
        closed = free_port("127.0.0.1")  # nothing listens: an upstream that refuses at once
        token_file = base / "webhook.token"
        token_file.write_text(WEBHOOK_TOKEN)
        node = start_mirror(
            base / "node",
            "--store=cache",
            f"--cluster-key-file={key_file}",
            f"--router-addr=127.0.0.1:{free_udp_port('127.0.0.1')}",
            "--mirrored-registries=docker.io",
            "--mirrored-registries=registry.test",
            f"--mirrored-registries={registry.host}",
            f"--upstream={registry.host}={registry.url}",
            f"--upstream=registry.test={registry.url}",
            f"--upstream=docker.io=http://127.0.0.1:{closed}",
            "--upstream-tag-timeout=500ms",
            f"--webhook-token-file={token_file}",
        )
        ns = urllib.parse.quote(registry.host, safe="")
        paths = [
            "/v2/",
            f"/v2/{REPO}/manifests/{image.tag}?ns={ns}",
            f"/v2/{REPO}/manifests/{image.manifest_digest}?ns={ns}",
            f"/v2/{REPO}/tags/list?ns={ns}",
            *(f"/v2/{REPO}/blobs/{digest}?ns={ns}" for digest in image.blobs),
            f"/v2/{registry.host}/{REPO}/manifests/{image.tag}",
            "/v2/library/app/manifests/latest",
            f"{REPORT_PATH_PREFIX}{image.manifest_digest}",  # a peer's corruption report
            "/mirror/v1/prefetch",  # pins: GET the status, POST an image to take now
            f"/mirror/v1/prefetch?ref={registry.host}/{REPO}:{image.tag}",
            "/mirror/v1/status",  # the node's status report (clients and peers)
            "/mirror/v1/measure",  # POST an image to pull into nothing, timed
            "/mirror/v1/distributions",  # GET the list, POST a tag to distribute
            "/mirror/v1/distributions/0123456789abcdef",
            "/mirror/v1/distributions/0123456789abcdef/report?node=127.0.0.1:5000",
            "/mirror/v1/events/distribution",  # webhooks, with and without the token
            "/mirror/v1/events/harbor",
            f"/mirror/v1/events/dockerhub?token={WEBHOOK_TOKEN}",
            "/mirror/v1/events/dockerhub?token=wrong",
        ]
        key = ClusterKey.load(key_file)
        yield Target(
            node.host, node.port, RequestSigner(key), UrlSigner(key), paths, node.metrics_port
        )
    finally:
        if node is not None:
            node.stop()
        registry.stop()
    log = node.process.log_text() if node is not None else ""
    assert "Traceback" not in log, log[-5000:]
    assert " ERROR " not in log, log[-5000:]


def mutate_path(rng: random.Random, path: str) -> str:
    """Replace, insert or drop path components and query values with nasty ones."""
    route, _, query = path.partition("?")
    parts = route.split("/")
    for _ in range(rng.randint(1, 3)):
        choice = rng.random()
        index = rng.randrange(len(parts))
        if choice < 0.5:
            parts[index] = rng.choice(NASTY)
        elif choice < 0.7:
            parts.insert(index, rng.choice(NASTY))
        elif len(parts) > 2:
            del parts[index]
    params = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if rng.random() < 0.5:
        name = rng.choice(["ns", "n", "last", "x", "last-resort", *SIGNED_URL_PARAMS])
        params.append((name, rng.choice(NASTY)))
    if rng.random() < 0.2:
        params = [(name, rng.choice(NASTY)) for name, _ in params]
    encoded = "/".join(parts)
    if rng.random() < 0.5:
        encoded = urllib.parse.quote(encoded, safe="/:@%")
    if params:
        encoded += "?" + "&".join(
            f"{name}={urllib.parse.quote(value, safe=':%') if rng.random() < 0.7 else value}"
            for name, value in params
        )
    return encoded


def build_request(rng: random.Random, target: Target) -> bytes:
    method = rng.choice(["GET", "GET", "GET", "HEAD", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"])
    path = rng.choice(target.paths)
    if rng.random() < 0.8:
        path = mutate_path(rng, path)
    headers = {"Host": "fuzz", "Connection": "close"}
    if rng.random() < 0.5:
        headers["Range"] = rng.choice(RANGES)
    peer = rng.random()
    if peer < 0.2:
        headers[PEER_HEADER] = target.signer.sign(method, path)  # authentic, odd path
    elif peer < 0.3 and not carries_url_signature(path):
        # An authentic signed URL for an odd path, now and then tampered with afterwards.
        path = target.url_signer.sign(method, f"{target.host}:{target.port}", path)
        if rng.random() < 0.3:
            path += rng.choice(["&mirror-sig=AAAA", "x", "&n=\u00b2", "%00"])
    elif peer < 0.5:
        stamp = rng.choice(["\u00b2", "9" * 400, "9" * 5000, "-1", "", "1" * 13])
        mac = rng.choice(["AAAA", "!!!", "\u00e9" * 4, "=" * 8, ""])
        headers[PEER_HEADER] = f"v1 {stamp} nonce {mac}"
    if rng.random() < 0.1:
        headers["Accept"] = rng.choice(NASTY)
    if rng.random() < 0.4:
        headers["Authorization"] = rng.choice(
            [f"Bearer {WEBHOOK_TOKEN}", "Bearer wrong", "Basic eDp5", "Bearer", NASTY[0]]
        )
    body = b""
    if method == "POST" and rng.random() < 0.7:
        body = rng.choice(PREFETCH_BODIES + EVENT_BODIES).encode("utf-8", "surrogateescape")
        headers["Content-Type"] = "application/json"
        headers["Content-Length"] = str(len(body))
    lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def status_of(host: str, port: int, request: bytes) -> int:
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(request)
        received = b""
        while b"\r\n" not in received:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
    status_line = received.split(b"\r\n", 1)[0]
    parts = status_line.split(b" ")
    assert len(parts) >= 2 and parts[0].startswith(b"HTTP/1."), (request[:300], received[:300])
    return int(parts[1])


@pytest.mark.parametrize("seed", SEEDS)
def test_garbage_never_gets_a_5xx(target: Target, seed: int) -> None:
    rng = random.Random(seed)
    seen: dict[int, int] = {}
    for _ in range(REQUESTS_PER_SEED):
        request = build_request(rng, target)
        status = status_of(target.host, target.port, request)
        assert status < 500, request[:500]
        seen[status] = seen.get(status, 0) + 1
    # The generator reaches real answers too, not only the parser's 400s.
    assert seen.get(200, 0) + seen.get(206, 0) > 0, seen
    assert sum(count for status, count in seen.items() if status in (400, 404)) > 0, seen
    healthy = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert status_of(target.host, target.port, healthy) == 200


def test_clients_that_leave_mid_body_cost_no_error(target: Target) -> None:
    """Runtimes cancel pulls: a client gone during sendfile is not the node's failure."""
    blobs = [path for path in target.paths if "/blobs/" in path]
    for _ in range(10):
        for path in blobs:
            request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            with socket.create_connection((target.host, target.port), timeout=30) as connection:
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
                connection.sendall(request)
                assert connection.recv(12).startswith(b"HTTP/1.1 200")
            # Closed with most of the body unread: the node sees a reset or a broken pipe.


@pytest.mark.parametrize("seed", SEEDS)
def test_the_metrics_address_takes_garbage_too(target: Target, seed: int) -> None:
    """The status page, the report and measure are served on the metrics address as well."""
    rng = random.Random(seed)
    metrics = Target(
        target.host,
        target.metrics_port,
        target.signer,
        target.url_signer,
        ["/", "/metrics", "/mirror/v1/status", "/mirror/v1/measure"],
    )
    seen: dict[int, int] = {}
    for _ in range(REQUESTS_PER_SEED // 4):
        request = build_request(rng, metrics)
        status = status_of(metrics.host, metrics.port, request)
        assert status < 500, request[:500]
        seen[status] = seen.get(status, 0) + 1
    assert seen.get(200, 0) > 0 and seen.get(404, 0) + seen.get(400, 0) > 0, seen
    healthy = b"GET /mirror/v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert status_of(metrics.host, metrics.port, healthy) == 200
