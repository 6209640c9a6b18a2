"""Private Docker Engine daemons (``dockerd``), one per simulated Docker host.

Each daemon keeps everything it writes under ``base_dir``: ``--data-root``, ``--exec-root``
(its sockets, and the state of the containerd it starts for itself), ``--pidfile``,
``--config-file`` and even the trust key (``deprecated-key-path`` in ``daemon.json``; without
it Docker 20.10 writes ``/etc/docker/key.json``). That is what lets several run side by side
next to, and without touching, a system Docker.

Networking is switched off (``--bridge=none --iptables=false --ip-masq=false``): the tests
pull images, they never run containers, and a bridge or iptables rules would be shared
state between daemons and the host. ``vfs`` is the storage driver that works anywhere,
including inside a container or on top of an overlay filesystem.

Without ``containerd_socket`` dockerd supervises a containerd of its own, configured under
``<exec-root>/containerd`` and ``<data-root>/containerd``; the daemon kills it on a clean
shutdown, and ``DockerNode.stop`` makes sure of it when the shutdown was not clean.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
import requests.exceptions

from .process import ManagedProcess

DOCKERD_BINARY = "dockerd"
DOCKER_BINARY = "docker"

# sun_path is 108 bytes on Linux. The longest socket dockerd makes under its exec-root is
# the managed containerd's ``containerd/containerd-debug.sock`` (libnetwork's
# ``libnetwork/<12 hex>.sock`` is shorter); pytest tmp dirs named after long tests overflow.
_MAX_SOCKET_PATH = 100
_LONGEST_SOCKET = "exec/containerd/containerd-debug.sock"

# The API version Docker 20.10 speaks: pinning it spares the SDK a version round trip.
_PING_API_VERSION = "1.41"


class DockerCliError(RuntimeError):
    """A ``docker`` CLI command failed; carries its output for the assertion message."""

    def __init__(self, args: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
        )
        self.proc = proc


@dataclass
class DockerNode:
    """A running dockerd and the ``docker`` CLI calls tests make against it."""

    base_dir: Path
    socket: Path
    data_root: Path
    exec_root: Path
    process: ManagedProcess
    containerd_socket: Path
    managed_containerd: bool
    _short_dir: Path | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        """``unix:///.../docker.sock``: for ``docker -H``, ``DOCKER_HOST`` and the SDK."""
        return f"unix://{self.socket}"

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    def cli_config_dir(self) -> Path:
        """A ``DOCKER_CONFIG`` of the node's own: root's ``~/.docker`` (contexts, credential
        helpers) must not change what the tests see."""
        return self.base_dir / "cli"

    def docker(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker -H HOST ARGS``, capturing output; raise ``DockerCliError`` if it fails."""
        argv = [DOCKER_BINARY, "-H", self.host, *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_CONFIG"] = str(self.cli_config_dir)
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
        if check and proc.returncode != 0:
            raise DockerCliError(argv, proc)
        return proc

    def pull(self, ref: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``docker pull REF`` (for the daemon's platform)."""
        return self.docker("pull", ref, timeout=timeout)

    def image_ids(self) -> list[str]:
        """The ``sha256:`` ids (config digests) of every image the daemon holds, sorted."""
        out = self.docker("images", "--all", "--quiet", "--no-trunc").stdout
        return sorted({line.strip() for line in out.splitlines() if line.strip()})

    def repo_digests(self, ref: str) -> list[str]:
        """``RepoDigests`` of image ``ref``: ``name@sha256:...`` of the manifests it came from."""
        out = self.docker("image", "inspect", "--format", "{{json .RepoDigests}}", ref).stdout
        digests: list[str] = json.loads(out)
        return digests

    def client(self, timeout: float = 10) -> docker.DockerClient:
        """A Docker SDK client for this daemon; the caller closes it."""
        return docker.DockerClient(base_url=self.host, version=_PING_API_VERSION, timeout=timeout)

    def ping(self, timeout: float = 2) -> bool:
        """Whether the daemon answers ``/_ping`` now."""
        try:
            api = docker.APIClient(base_url=self.host, version=_PING_API_VERSION, timeout=timeout)
        except docker.errors.DockerException:
            return False
        try:
            return bool(api.ping())
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError):
            return False
        finally:
            api.close()

    @property
    def running(self) -> bool:
        return self.process.running

    def stop(self, term_timeout: float = 20.0) -> None:
        """Stop dockerd and its managed containerd; undo its mounts. Idempotent.

        A clean SIGTERM shutdown does all of it by itself. The rest is for a daemon that had
        to be killed: the supervised containerd is found through its pid file, and the
        bind mount dockerd puts on its data root (to make it a shared mount) is unmounted.
        """
        self.process.stop(term_timeout=term_timeout)
        if self.managed_containerd:
            _kill_managed_containerd(self.exec_root, term_timeout)
        _unmount_under([self.base_dir, self.exec_root])
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)
            self._short_dir = None


def _kill_managed_containerd(exec_root: Path, timeout: float) -> None:
    """SIGTERM, then SIGKILL, the containerd dockerd started, if it outlived dockerd.

    The pid is only trusted when that process's command line names this exec-root: a stale
    pid file must never make the harness kill somebody else's process.
    """
    pid_file = exec_root / "containerd" / "containerd.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _is_our_containerd(pid, exec_root):
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _is_our_containerd(pid, exec_root):
            time.sleep(0.05)


def _is_our_containerd(pid: int, exec_root: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie (state Z) is dead already; it only waits for its parent to reap it.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and str(exec_root).encode() in cmdline


def _unmount_under(dirs: Sequence[Path]) -> None:
    """Lazily unmount every mount point at or below ``dirs``, deepest first."""
    prefixes = [str(d) for d in dirs]
    points: list[str] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        # Field 5 is the mount point, with spaces and the like octal-escaped.
        point = line.split()[4].encode().decode("unicode_escape")
        if any(point == p or point.startswith(p + "/") for p in prefixes):
            points.append(point)
    for point in sorted(set(points), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False, timeout=30)


def _daemon_json(
    base_dir: Path, registry_mirrors: Sequence[str], insecure_registries: Sequence[str]
) -> str:
    config: dict[str, object] = {
        # Docker 20.10 has no flag for the trust key; without this it lands in /etc/docker.
        "deprecated-key-path": str(base_dir / "key.json"),
    }
    if registry_mirrors:
        config["registry-mirrors"] = list(registry_mirrors)
    if insecure_registries:
        config["insecure-registries"] = list(insecure_registries)
    return json.dumps(config, indent=2) + "\n"


def start_dockerd(
    base_dir: Path,
    *,
    registry_mirrors: Sequence[str] = (),
    insecure_registries: Sequence[str] = (),
    containerd_socket: Path | None = None,
    containerd_namespace: str | None = None,
    timeout: float = 60,
) -> DockerNode:
    """Write ``daemon.json`` under ``base_dir``, start dockerd, wait until it answers.

    ``registry_mirrors`` are URLs (``http://127.0.0.1:PORT``); Docker consults them for
    ``docker.io`` images only. ``127.0.0.0/8`` is an insecure (plain-HTTP) registry range by
    default, so a registry on loopback needs no ``insecure_registries`` entry.

    With ``containerd_socket`` dockerd uses that containerd instead of starting one;
    ``containerd_namespace`` then keeps two dockerds sharing it apart (it sets both the
    ``--containerd-namespace`` and, suffixed ``-plugins``, the plugin namespace).

    The exec-root and ``docker.sock`` live in ``base_dir/run`` unless that path is too long
    for a Unix socket; then they go to a short temporary directory removed by ``stop()``.
    """
    base_dir.mkdir(parents=True, exist_ok=True)
    short_dir: Path | None = None
    run_dir = base_dir / "run"
    if len(str(run_dir / _LONGEST_SOCKET)) > _MAX_SOCKET_PATH:
        short_dir = Path(tempfile.mkdtemp(prefix="dkd-"))
        run_dir = short_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    data_root = base_dir / "data"
    exec_root = run_dir / "exec"
    sock = run_dir / "docker.sock"
    config = base_dir / "daemon.json"
    config.write_text(_daemon_json(base_dir, registry_mirrors, insecure_registries))
    (base_dir / "cli").mkdir(exist_ok=True)

    argv = [
        DOCKERD_BINARY,
        "--data-root",
        str(data_root),
        "--exec-root",
        str(exec_root),
        "--pidfile",
        str(base_dir / "docker.pid"),
        "-H",
        f"unix://{sock}",
        "--config-file",
        str(config),
        "--iptables=false",
        "--ip-masq=false",
        "--bridge=none",
        "--storage-driver=vfs",
    ]
    if containerd_socket is not None:
        argv += ["--containerd", str(containerd_socket)]
        if containerd_namespace is not None:
            argv += [
                "--containerd-namespace",
                containerd_namespace,
                "--containerd-plugins-namespace",
                f"{containerd_namespace}-plugins",
            ]
    # DOCKER_* variables meant for a client (DOCKER_HOST, DOCKER_CONFIG) must not leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    process = ManagedProcess(argv, base_dir, "dockerd", env=env)
    node = DockerNode(
        base_dir=base_dir,
        socket=sock,
        data_root=data_root,
        exec_root=exec_root,
        process=process,
        containerd_socket=containerd_socket or exec_root / "containerd" / "containerd.sock",
        managed_containerd=containerd_socket is None,
        _short_dir=short_dir,
    )
    process.start()
    try:
        _wait_ready(node, timeout)
    except BaseException:
        node.stop()
        raise
    return node


def _wait_ready(node: DockerNode, timeout: float) -> None:
    """Poll ``/_ping`` on the socket until the daemon answers, or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        node.process.ensure_running()
        if node.socket.exists() and node.ping(timeout=2):
            return
        time.sleep(0.05)
    node.process.ensure_running()
    raise TimeoutError(f"dockerd at {node.socket} not ready in {timeout}s; see {node.log_path}")
