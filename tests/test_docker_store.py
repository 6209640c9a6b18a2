"""Docker detection against a real dockerd, and the wire behaviour of Docker pulls.

mirror serves Docker nodes in two ways (see ``mirror.stores.docker``): through the
containerd backend when Docker uses the containerd image store, or from its cache when
dockerd pulls through it as a ``registry-mirrors`` entry. The second relies on how dockerd
talks to a mirror, which these tests pin down with a real dockerd (20.10 here) and a real
distribution registry standing in for the mirror.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from harness.containerd import ContainerdNode
from harness.dockerd import DockerNode
from harness.images import TestImages
from harness.registry import Registry

from mirror.cli import build_parser, run_config
from mirror.errors import StoreUnavailable
from mirror.stores.docker import DockerEngine, engine_from_info, inspect_docker


async def test_inspect_classic_dockerd(dockerd_factory: Callable[..., DockerNode]) -> None:
    node = dockerd_factory()
    engine = await inspect_docker(node.host)
    assert engine == DockerEngine(version=engine.version, containerd_image_store=False)
    assert engine.version.startswith("20.10"), engine.version
    assert engine.containerd_namespace == "moby"

    # DOCKER_HOST, as the docker CLI reads it, reaches the daemon: mirror.cli resolves it
    # into RunConfig.docker_host (inspect_docker reads no variables itself).
    args = build_parser({"DOCKER_HOST": node.host}).parse_args(["run", "--store=docker"])
    assert await inspect_docker(run_config(args).docker_host) == engine


async def test_missing_socket_is_store_unavailable_quickly(tmp_path: Path) -> None:
    host = f"unix://{tmp_path / 'nothing-here.sock'}"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        await inspect_docker(host)
    assert time.monotonic() - started < 2
    message = str(info.value)
    assert "\n" not in message and host in message


@pytest.fixture
def silent_socket() -> Iterator[Path]:
    """A Unix socket that accepts connections and never answers (a hung daemon)."""
    # Not under tmp_path: sun_path is 108 bytes and pytest's paths can be longer.
    directory = Path(tempfile.mkdtemp(prefix="mirror-silent-"))
    path = directory / "docker.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    try:
        yield path
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


async def test_hung_daemon_is_store_unavailable_after_timeout(silent_socket: Path) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="Docker daemon at unix://"):
        await inspect_docker(f"unix://{silent_socket}", timeout=0.5)
    assert time.monotonic() - started < 2


def test_engine_from_info_containerd_image_store() -> None:
    # Shape of `GET /info` from Docker 27 with the containerd-snapshotter feature; Docker
    # 20.10 has no such store, so this part is checked on recorded data only.
    info = {
        "ServerVersion": "27.3.1",
        "Driver": "overlayfs",
        "DriverStatus": [["driver-type", "io.containerd.snapshotter.v1"]],
        "Containerd": {
            "Address": "/run/containerd/containerd.sock",
            "Namespaces": {"Containers": "moby", "Plugins": "plugins.moby"},
        },
    }
    assert engine_from_info(info) == DockerEngine(
        version="27.3.1",
        containerd_image_store=True,
        containerd_namespace="moby",
        containerd_address="/run/containerd/containerd.sock",
    )
    classic = {
        "ServerVersion": "24.0.7",
        "Driver": "overlay2",
        "DriverStatus": [["Backing Filesystem", "extfs"], ["Supports d_type", "true"]],
    }
    assert engine_from_info(classic) == DockerEngine("24.0.7", containerd_image_store=False)
    vfs = engine_from_info({"ServerVersion": "20.10.24", "Driver": "vfs", "DriverStatus": None})
    assert not vfs.containerd_image_store


def test_dockerd_side_by_side_and_mirror_wire_shape(
    test_images: TestImages,
    registry: Registry,
    dockerd_factory: Callable[..., DockerNode],
) -> None:
    """docker.io pulls reach a registry mirror as plain ``/v2/library/<name>/...`` requests.

    The registry plays the mirror: nothing else is reachable, so a pull that succeeds was
    served by it. The Docker schema-2 image and an OCI index (with OCI manifests) both pull.
    """
    app, idx = test_images.docker_v2, test_images.index
    app.push(registry.host, "library/app")
    idx.push(registry.host, "library/idx")
    registry.clear_access_log()

    via_mirror = dockerd_factory(registry_mirrors=[registry.url])
    direct = dockerd_factory()
    assert via_mirror.socket != direct.socket
    assert via_mirror.exec_root != direct.exec_root

    via_mirror.pull("app:v1")
    assert via_mirror.repo_digests("app:v1") == [f"app@{app.manifest_digest}"]
    # The classic store's image id is the config digest: the one byte-exact blob it keeps.
    assert via_mirror.image_ids() == [app.config_digest]

    entries = registry.requests()
    assert entries, "the pull never reached the mirror"
    assert all("?" not in e.uri for e in entries), "dockerd sent a query (ns=) to a mirror"
    assert all(e.path == "/v2/" or e.path.startswith("/v2/library/app/") for e in entries)
    shapes = [(e.method, e.path) for e in entries]
    assert ("HEAD", "/v2/library/app/manifests/v1") in shapes
    assert ("GET", f"/v2/library/app/manifests/{app.manifest_digest}") in shapes
    for digest in [app.config_digest, *app.layer_digests]:
        assert ("GET", f"/v2/library/app/blobs/{digest}") in shapes

    # OCI index -> OCI manifest: Docker 20.10 pulls those through a mirror as well.
    via_mirror.pull("idx:v1")
    assert via_mirror.repo_digests("idx:v1") == [f"idx@{idx.manifest_digest}"]
    assert idx.config_digest in via_mirror.image_ids()

    # A registry on 127.0.0.0/8 is insecure (plain HTTP) by default: no daemon.json entry.
    ref = f"{registry.host}/library/app:v1"
    direct.pull(ref)
    assert direct.repo_digests(ref) == [f"{registry.host}/library/app@{app.manifest_digest}"]
    assert direct.image_ids() == [app.config_digest], "the two daemons share image state"


class _RefusingMirror(BaseHTTPRequestHandler):
    """Records each request's method, path and Accept headers; answers with a registry error."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, list[str]]]

    def _answer(self) -> None:
        self.seen.append((self.command, self.path, self.headers.get_all("Accept") or []))
        if self.path == "/v2/":
            body = b"{}"
            self.send_response(200)
        else:
            body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}'
            self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_dockerd_accept_headers_and_fallback(dockerd_factory: Callable[..., DockerNode]) -> None:
    """dockerd sends one ``Accept`` header per media type, and skips a mirror that says 404.

    A mirror must honour every ``Accept`` header, not just the first; and a registry error
    from the mirror is not final: dockerd goes on to Docker Hub (unreachable here).
    """
    seen: list[tuple[str, str, list[str]]] = []
    handler = type("Handler", (_RefusingMirror,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        node = dockerd_factory(registry_mirrors=[f"http://127.0.0.1:{server.server_port}"])
        proc = node.docker("pull", "probe:v1", check=False, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode != 0
    heads = [s for s in seen if s[:2] == ("HEAD", "/v2/library/probe/manifests/v1")]
    assert heads, seen
    accepts = heads[0][2]
    assert len(accepts) > 1, accepts
    assert {
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    } <= set(accepts)
    assert not node.image_ids()


def test_dockerd_on_a_shared_containerd(
    containerd_factory: Callable[[], ContainerdNode],
    dockerd_factory: Callable[..., DockerNode],
) -> None:
    """``containerd_socket`` replaces the managed containerd; namespaces keep daemons apart."""
    containerd = containerd_factory()
    first = dockerd_factory(containerd_socket=containerd.socket, containerd_namespace="dk-a")
    second = dockerd_factory(containerd_socket=containerd.socket, containerd_namespace="dk-b")
    for node in (first, second):
        assert not node.managed_containerd
        assert node.docker("info", "--format", "{{.DockerRootDir}}").stdout.strip() == str(
            node.data_root
        )
    assert not (first.exec_root / "containerd").exists()
