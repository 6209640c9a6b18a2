"""containers/image tools (podman, skopeo) reading a node's `/etc/containers` made by a test.

containers/image reads its drop-ins from `/etc/containers/registries.conf.d` only:
`CONTAINERS_REGISTRIES_CONF` replaces the main file but there is no variable for the directory
(`CONTAINERS_REGISTRIES_CONF_DIR` is not honoured by podman 4.3). So each command runs in a
private mount namespace (`unshare --mount`) where the test's directory is bind-mounted over
`/etc/containers`: the tool reads the main file and the drop-ins exactly as on a node, merge
order included, and the machine's own `/etc/containers` is never touched. The mount goes away
with the command.

podman gets a throwaway store per pull (`--storage-driver vfs --root --runroot`), so "an empty
store" is a new directory. podman refuses a runroot path longer than 50 characters, which pytest's
temporary directories are: runroots live in a short directory of /tmp, removed by `close()`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PODMAN_BINARY = "podman"
SKOPEO_BINARY = "skopeo"
UNSHARE_BINARY = "unshare"

# Accept any image: signature policy is not what these tests are about.
INSECURE_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}
# Bind `$1` over /etc/containers, then run the rest. Mounts made in the new namespace are
# private (--propagation private): nothing leaks to the host's mount table.
_BIND_AND_RUN = 'mount --bind "$1" /etc/containers && shift && exec "$@"'


@dataclass
class ContainersHost:
    """A host's `/etc/containers` (`etc_dir`) and the tools that read it."""

    etc_dir: Path
    work_dir: Path
    # Short enough for podman's runroot limit; removed by close().
    run_dir: Path

    @classmethod
    def create(cls, base_dir: Path) -> ContainersHost:
        """An `/etc/containers` with a policy, an empty main file and no drop-ins yet."""
        etc_dir = base_dir / "etc-containers"
        (etc_dir / "registries.conf.d").mkdir(parents=True)
        (etc_dir / "policy.json").write_text(json.dumps(INSECURE_POLICY))
        (etc_dir / "registries.conf").write_text("")
        (base_dir / "home").mkdir()
        return cls(etc_dir, base_dir, Path(tempfile.mkdtemp(prefix="podman-", dir="/tmp")))

    def close(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)

    @property
    def registries_dir(self) -> Path:
        return self.etc_dir / "registries.conf.d"

    def run(self, *argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """`argv` with this host's `/etc/containers`; HOME is a fresh directory, so no per-user
        registries.conf (which would hide the system's files) can be read."""
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.work_dir / "home"),
        }
        command = [UNSHARE_BINARY, "--mount", "--propagation", "private", "--", "sh", "-c"]
        return subprocess.run(
            [*command, _BIND_AND_RUN, "sh", str(self.etc_dir), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )

    def podman(self, store: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """podman on the store in `store` (vfs: no overlay mounts, nothing left mounted); its
        runroot is named after `store`, so each store needs a name of its own."""
        return self.run(
            PODMAN_BINARY,
            "--storage-driver=vfs",
            f"--root={store / 'root'}",
            f"--runroot={self.run_dir / store.name}",
            f"--tmpdir={store / 'tmp'}",
            "--cgroup-manager=cgroupfs",
            "--events-backend=none",
            *args,
        )

    def pull(self, ref: str, store: Path) -> str:
        """`podman pull ref` into `store`; returns the image's manifest digest as podman
        recorded it. Fails with podman's output when the pull fails."""
        pulled = self.podman(store, "pull", "--quiet", ref)
        assert pulled.returncode == 0, f"podman pull {ref}: {pulled.stderr}{pulled.stdout}"
        inspect = self.podman(store, "image", "inspect", "--format", "{{.Digest}}", ref)
        assert inspect.returncode == 0, f"podman image inspect {ref}: {inspect.stderr}"
        return inspect.stdout.strip()

    def skopeo_copy(self, ref: str, destination: Path) -> Path:
        """`skopeo copy docker://ref dir:destination`; returns the copied manifest's path."""
        copied = self.run(SKOPEO_BINARY, "copy", f"docker://{ref}", f"dir:{destination}")
        assert copied.returncode == 0, f"skopeo copy {ref}: {copied.stderr}{copied.stdout}"
        return destination / "manifest.json"
