"""Private containerd daemons, one per simulated cluster node.

Each node has its own root, state and sockets under ``base_dir`` so several run side by
side on one machine without touching the system containerd. The CRI plugin is disabled:
nodes are driven with ``ctr`` and the gRPC API, never by a kubelet.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .process import ManagedProcess

CONTAINERD_BINARY = "containerd"
CTR_BINARY = "ctr"
DEFAULT_NAMESPACE = "k8s.io"

# sun_path is 108 bytes on Linux; pytest tmp dirs named after long test names overflow it.
_MAX_SOCKET_PATH = 100


def _toml_str(value: str | Path) -> str:
    """A TOML basic string; JSON escaping is a valid subset for paths and URLs."""
    return json.dumps(str(value))


class CtrError(RuntimeError):
    """A ``ctr`` command failed; carries its output for the assertion message."""

    def __init__(self, args: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
        )
        self.proc = proc


@dataclass
class ContainerdNode:
    """A running containerd and the ``ctr`` calls tests make against it."""

    base_dir: Path
    socket: Path
    root: Path
    state: Path
    process: ManagedProcess
    namespace: str = DEFAULT_NAMESPACE
    _short_dir: Path | None = field(default=None, repr=False)

    @property
    def content_dir(self) -> Path:
        """The content store: blobs at ``content_dir/blobs/sha256/<hex>``."""
        return self.root / "io.containerd.content.v1.content"

    def blob_path(self, digest: str) -> Path:
        algo, hex_ = digest.split(":", 1)
        return self.content_dir / "blobs" / algo / hex_

    def has_blob(self, digest: str) -> bool:
        """Whether the bytes are on disk (any namespace: the store is shared)."""
        return self.blob_path(digest).is_file()

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def ctr(
        self,
        *args: str,
        namespace: str | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr -a SOCK -n NS ARGS``, capturing output; raise ``CtrError`` if it fails."""
        argv = [CTR_BINARY, "-a", str(self.socket), "-n", namespace or self.namespace, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise CtrError(argv, proc)
        return proc

    def pull(
        self,
        ref: str,
        *,
        plain_http: bool = False,
        hosts_dir: Path | None = None,
        extra_args: Sequence[str] = (),
        namespace: str | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr images pull`` (which also unpacks) for the host platform."""
        args = ["images", "pull"]
        if plain_http:
            args.append("--plain-http")
        if hosts_dir is not None:
            args += ["--hosts-dir", str(hosts_dir)]
        args += [*extra_args, ref]
        return self.ctr(*args, namespace=namespace, timeout=timeout)

    def images(self, namespace: str | None = None) -> dict[str, str]:
        """Image name -> target digest, parsed from ``ctr images ls``.

        Columns are REF TYPE DIGEST SIZE PLATFORMS LABELS; names and digests hold no
        spaces, so whitespace splitting is safe for the first three.
        """
        out = self.ctr("images", "ls", namespace=namespace).stdout
        result: dict[str, str] = {}
        for line in out.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3:
                result[fields[0]] = fields[2]
        return result

    def image_target(self, ref: str, namespace: str | None = None) -> str:
        """The target digest of image ``ref``; ``KeyError`` if there is none."""
        images = self.images(namespace)
        if ref not in images:
            raise KeyError(f"no image {ref!r} in {namespace or self.namespace}: {sorted(images)}")
        return images[ref]

    def tag(self, src: str, dst: str, namespace: str | None = None) -> None:
        """``ctr images tag --force`` (a second name for the same target)."""
        self.ctr("images", "tag", "--force", src, dst, namespace=namespace)

    def remove_image(self, ref: str, namespace: str | None = None) -> None:
        """``ctr images rm --sync``: delete the name and wait for the GC to run."""
        self.ctr("images", "rm", "--sync", ref, namespace=namespace)

    @property
    def running(self) -> bool:
        return self.process.running

    def stop(self) -> None:
        """Stop the daemon (idempotent); remove the short socket dir if one was made."""
        self.process.stop()
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)
            self._short_dir = None


def _config_text(
    root: Path, state: Path, sock_dir: Path, base_dir: Path, *, cri_hosts_dir: Path | None = None
) -> str:
    """CRI off, unless `cri_hosts_dir` is given: then its image service pulls through the
    hosts.toml files there (as a kubelet's pulls do), its streaming server on a loopback port."""
    if cri_hosts_dir is None:
        disabled, cri = 'disabled_plugins = ["io.containerd.grpc.v1.cri"]', ""
    else:
        disabled = ""
        cri = f"""
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = {_toml_str(base_dir / "cni")}
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = {_toml_str(cri_hosts_dir)}
"""
    return f"""\
version = 2
root = {_toml_str(root)}
state = {_toml_str(state)}
{disabled}

[grpc]
  address = {_toml_str(sock_dir / "containerd.sock")}

[ttrpc]
  address = {_toml_str(sock_dir / "containerd.sock.ttrpc")}

[debug]
  address = {_toml_str(sock_dir / "debug.sock")}
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = {_toml_str(base_dir / "opt")}
{cri}"""


def start_containerd(
    base_dir: Path, *, namespace: str = DEFAULT_NAMESPACE, timeout: float = 20.0
) -> ContainerdNode:
    """Write a config under ``base_dir``, start containerd, wait until it answers.

    Sockets live in ``base_dir`` unless that path is too long for a Unix socket; then
    they go to a short temporary directory removed by ``stop()``.
    """
    base_dir.mkdir(parents=True, exist_ok=True)
    root = base_dir / "root"
    state = base_dir / "state"
    short_dir: Path | None = None
    sock_dir = base_dir
    if len(str(base_dir / "containerd.sock.ttrpc")) > _MAX_SOCKET_PATH:
        short_dir = Path(tempfile.mkdtemp(prefix="ctrd-"))
        sock_dir = short_dir
    config = base_dir / "config.toml"
    config.write_text(_config_text(root, state, sock_dir, base_dir))
    process = ManagedProcess([CONTAINERD_BINARY, "--config", str(config)], base_dir, "containerd")
    node = ContainerdNode(
        base_dir=base_dir,
        socket=sock_dir / "containerd.sock",
        root=root,
        state=state,
        process=process,
        namespace=namespace,
        _short_dir=short_dir,
    )
    process.start()
    try:
        _wait_ready(node, timeout)
    except BaseException:
        node.stop()
        raise
    return node


def _wait_ready(node: ContainerdNode, timeout: float) -> None:
    """Poll ``ctr version`` until the daemon answers on its socket."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        node.process.ensure_running()
        if node.socket.exists():
            proc = node.ctr("version", check=False, timeout=5)
            if proc.returncode == 0:
                return
            last = proc.stderr
        time.sleep(0.02)
    raise TimeoutError(f"containerd at {node.socket} not ready in {timeout}s: {last}")


def write_hosts_toml(
    hosts_dir: Path, registry_host: str, server_url: str, mirror_urls: Sequence[str]
) -> Path:
    """Write ``hosts_dir/<registry_host>/hosts.toml`` sending pulls to mirrors first.

    containerd tries each ``[host]`` in order for pull and resolve and falls back to
    ``server`` when a mirror fails. Plain-HTTP URLs need no ``--plain-http`` here: the
    scheme in the file decides.
    """
    directory = hosts_dir / registry_host
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"server = {_toml_str(server_url)}", ""]
    for url in mirror_urls:
        lines += [f"[host.{_toml_str(url)}]", '  capabilities = ["pull", "resolve"]', ""]
    path = directory / "hosts.toml"
    path.write_text("\n".join(lines))
    return path
