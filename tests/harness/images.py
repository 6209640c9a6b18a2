"""Synthetic OCI images built in Python, so tests need no network and no Docker Hub.

Each image is written as an OCI image layout (``oci-layout``, ``index.json``,
``blobs/sha256/<hex>``) and pushed with ``skopeo copy --all --preserve-digests``, which
uploads the stored bytes as they are: the digests a test computes here are the digests
the registry, containerd and the mirror see.

Layers are real tar+gzip files (gzip ``mtime=0``, no file name, tar entries with fixed
owner and time) so containerd can unpack them and their digests depend only on their
content. The content is random, so every session gets fresh digests and no state leaks
between runs. The 64 MiB layer is gzip level 0 (stored): level 1 on random data takes
~2 s, level 0 ~0.2 s, and both are valid gzip.

The Docker schema-2 image cannot come from an OCI layout: skopeo 1.9's ``oci:`` source
only accepts ``index.json`` entries with OCI media types ("no descriptor found for
reference"). It is therefore written in skopeo's ``dir:`` format instead (``manifest.json``,
each blob as a file named by its hex digest, a ``version`` file), which skopeo pushes
byte for byte with ``--preserve-digests``; the sanity test checks the digest upstream.
``TestImage.transport`` says which format ``layout_dir`` holds.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

BIG_LAYER_SIZE = 64 * 1024 * 1024
DEFAULT_TAG = "v1"
HOST_PLATFORM = ("linux", "amd64")

SKOPEO_BINARY = "skopeo"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Compact, key-sorted JSON: the same object always gives the same bytes and digest."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def make_layer(files: dict[str, bytes], *, compresslevel: int = 1) -> tuple[bytes, str]:
    """Build a tar+gzip layer holding ``files``; return (compressed bytes, diff_id).

    The diff_id (digest of the uncompressed tar) is what the config's ``rootfs`` lists
    and what containerd checks when it unpacks.
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(name).parent) for name in files} - {"."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            _normalise(info)
            tar.addfile(info)
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            _normalise(info)
            tar.addfile(info, io.BytesIO(content))
    tar_bytes = raw.getvalue()
    diff_id = sha256_digest(tar_bytes)
    return gzip.compress(tar_bytes, compresslevel=compresslevel, mtime=0), diff_id


def _normalise(info: tarfile.TarInfo) -> None:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""


@dataclass
class TestImage:
    """One synthetic image in an OCI layout, and what a pull of it must fetch.

    ``blobs`` holds every blob reachable from the top (index, manifests, configs, layers);
    ``host_blobs`` the subset a linux/amd64 pull fetches. ``host_manifest_digest`` is the
    image manifest used on linux/amd64 (the top manifest itself unless it is an index).
    """

    __test__ = False  # not a pytest test class despite the name

    name: str
    layout_dir: Path
    tag: str
    manifest_digest: str
    media_type: str
    blobs: dict[str, int]
    host_blobs: dict[str, int]
    host_manifest_digest: str = ""
    config_digest: str = ""
    layer_digests: list[str] = field(default_factory=list)
    transport: str = "oci"  # "oci" (OCI image layout) or "dir" (skopeo dir: format)

    @property
    def source(self) -> str:
        """The skopeo source reference of the layout."""
        if self.transport == "dir":
            return f"dir:{self.layout_dir}"
        return f"oci:{self.layout_dir}:{self.tag}"

    def blob_path(self, digest: str) -> Path:
        """Where the bytes of ``digest`` lie in ``layout_dir`` (for byte comparisons)."""
        algo, hex_ = digest.split(":", 1)
        if self.transport == "dir":
            if digest == self.manifest_digest:
                return self.layout_dir / "manifest.json"
            return self.layout_dir / hex_
        return self.layout_dir / "blobs" / algo / hex_

    def blob_bytes(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def push(self, registry_host: str, repo: str) -> str:
        """Copy the image (all platforms, digests untouched) to a plain-HTTP registry.

        Returns the reference ``HOST/REPO:TAG``.
        """
        return self.push_as(registry_host, repo, self.tag)

    def push_as(self, registry_host: str, repo: str, tag: str) -> str:
        """`push` under another tag (the layout names the image `self.tag`)."""
        ref = f"{registry_host}/{repo}:{tag}"
        run_skopeo(
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            self.source,
            f"docker://{ref}",
        )
        return ref


@dataclass
class TestImages:
    """The three images every end-to-end test may use."""

    __test__ = False

    multi_layer: TestImage
    index: TestImage
    docker_v2: TestImage

    def all(self) -> list[TestImage]:
        return [self.multi_layer, self.index, self.docker_v2]


def run_skopeo(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Run skopeo, raising with its stderr on failure."""
    proc = subprocess.run(
        [SKOPEO_BINARY, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"skopeo {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
        )
    return proc


def inspect_raw(ref: str, *, tls_verify: bool = False) -> bytes:
    """The exact manifest bytes a registry serves for ``ref`` (``HOST/REPO:TAG``)."""
    proc = subprocess.run(
        [
            SKOPEO_BINARY,
            "inspect",
            "--raw",
            f"--tls-verify={str(tls_verify).lower()}",
            f"docker://{ref}",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"skopeo inspect --raw {ref} failed: {proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout


class _Layout:
    """Writes blobs into an OCI layout and remembers each one's size."""

    def __init__(self, layout_dir: Path) -> None:
        self.dir = layout_dir
        self.blob_dir = layout_dir / "blobs" / "sha256"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        (layout_dir / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.sizes: dict[str, int] = {}

    def add(self, data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
        """Store ``data``; return its descriptor."""
        digest = sha256_digest(data)
        path = self.blob_dir / digest.split(":", 1)[1]
        if not path.exists():
            path.write_bytes(data)
        self.sizes[digest] = len(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def add_json(self, obj: dict[str, Any], media_type: str, **extra: Any) -> dict[str, Any]:
        return self.add(canonical_json(obj), media_type, **extra)

    def tag(self, top: dict[str, Any], tag: str) -> None:
        """Write ``index.json`` pointing ``tag`` at descriptor ``top``."""
        ref = {**top, "annotations": {"org.opencontainers.image.ref.name": tag}}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [ref]}
        (self.dir / "index.json").write_bytes(canonical_json(index))


class _DirLayout(_Layout):
    """skopeo's ``dir:`` format: one image, blobs as ``<hex>``, ``manifest.json`` on top."""

    def __init__(self, layout_dir: Path) -> None:
        self.dir = layout_dir
        self.blob_dir = layout_dir
        layout_dir.mkdir(parents=True, exist_ok=True)
        (layout_dir / "version").write_text("Directory Transport Version: 1.1\n")
        self.sizes = {}

    def tag(self, top: dict[str, Any], tag: str) -> None:
        """The format holds no tag; the top manifest becomes ``manifest.json``."""
        hex_path = self.blob_dir / top["digest"].split(":", 1)[1]
        hex_path.rename(self.dir / "manifest.json")


def _config(os_: str, arch: str, diff_ids: list[str]) -> dict[str, Any]:
    return {
        "architecture": arch,
        "os": os_,
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "mirror test harness"} for _ in diff_ids],
    }


def _image_manifest(
    layout: _Layout,
    layers: list[tuple[bytes, str]],
    platform: tuple[str, str],
    *,
    docker: bool = False,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Store config, layers and manifest; return (manifest desc, config desc, layer descs)."""
    layer_type = DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
    layer_descs = [layout.add(blob, layer_type) for blob, _ in layers]
    config = _config(platform[0], platform[1], [diff_id for _, diff_id in layers])
    config_desc = layout.add_json(config, DOCKER_CONFIG if docker else OCI_CONFIG)
    manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config_desc,
        "layers": layer_descs,
    }
    return layout.add_json(manifest, manifest_type), config_desc, layer_descs


def _small_layer(label: str, size: int = 4096) -> tuple[bytes, str]:
    return make_layer({f"{label}/data.bin": os.urandom(size), f"{label}/name": label.encode()})


def _single(
    name: str, layout_dir: Path, layers: list[tuple[bytes, str]], docker: bool
) -> TestImage:
    layout = _DirLayout(layout_dir) if docker else _Layout(layout_dir)
    top, config, layer_descs = _image_manifest(layout, layers, HOST_PLATFORM, docker=docker)
    layout.tag(top, DEFAULT_TAG)
    return TestImage(
        transport="dir" if docker else "oci",
        name=name,
        layout_dir=layout_dir,
        tag=DEFAULT_TAG,
        manifest_digest=top["digest"],
        media_type=top["mediaType"],
        blobs=dict(layout.sizes),
        host_blobs=dict(layout.sizes),
        host_manifest_digest=top["digest"],
        config_digest=config["digest"],
        layer_digests=[d["digest"] for d in layer_descs],
    )


def build_multi_layer(layout_dir: Path) -> TestImage:
    """OCI manifest, linux/amd64, three layers: small, >= 64 MiB, small."""
    big = make_layer({"big/blob.bin": os.urandom(BIG_LAYER_SIZE)}, compresslevel=0)
    layers = [_small_layer("first"), big, _small_layer("third", 128 * 1024)]
    return _single("multi_layer", layout_dir, layers, docker=False)


def build_docker_v2(layout_dir: Path) -> TestImage:
    """Docker schema-2 manifest with a Docker config and two small Docker layers."""
    layers = [_small_layer("docker-a"), _small_layer("docker-b", 32 * 1024)]
    return _single("docker_v2", layout_dir, layers, docker=True)


def build_index(layout_dir: Path) -> TestImage:
    """OCI index over linux/amd64 and linux/arm64, each with its own config and layer."""
    layout = _Layout(layout_dir)
    entries = []
    host: tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]] | None = None
    host_sizes: dict[str, int] = {}
    for os_, arch in [HOST_PLATFORM, ("linux", "arm64")]:
        before = set(layout.sizes)
        built = _image_manifest(layout, [_small_layer(f"index-{arch}")], (os_, arch))
        manifest_desc = built[0]
        entries.append({**manifest_desc, "platform": {"architecture": arch, "os": os_}})
        if (os_, arch) == HOST_PLATFORM:
            host = built
            host_sizes = {d: s for d, s in layout.sizes.items() if d not in before}
    assert host is not None
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    top = layout.add_json(index, OCI_INDEX)
    layout.tag(top, DEFAULT_TAG)
    host_sizes[top["digest"]] = top["size"]
    return TestImage(
        name="index",
        layout_dir=layout_dir,
        tag=DEFAULT_TAG,
        manifest_digest=top["digest"],
        media_type=OCI_INDEX,
        blobs=dict(layout.sizes),
        host_blobs=host_sizes,
        host_manifest_digest=host[0]["digest"],
        config_digest=host[1]["digest"],
        layer_digests=[d["digest"] for d in host[2]],
    )


BUSYBOX_BINARY = Path("/bin/busybox")  # Debian's busybox-static: runs with no libraries


def build_busybox(layout_dir: Path, *, name: str = "busybox", docker: bool = False) -> TestImage:
    """An image a container can start from: one layer with ``bin/busybox`` (mode 0755).

    Run it with ``/bin/busybox echo ok``. A second small layer of random bytes makes each
    build's digests fresh, so no store holds the image before a test puts it there.
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo("bin")
        directory.type, directory.mode = tarfile.DIRTYPE, 0o755
        _normalise(directory)
        tar.addfile(directory)
        binary = BUSYBOX_BINARY.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(binary), 0o755
        _normalise(info)
        tar.addfile(info, io.BytesIO(binary))
    tar_bytes = raw.getvalue()
    busybox_layer = (gzip.compress(tar_bytes, compresslevel=1, mtime=0), sha256_digest(tar_bytes))
    return _single(name, layout_dir, [busybox_layer, _small_layer(f"{name}-fresh")], docker)


def build_test_images(workdir: Path) -> TestImages:
    """Build the three images under ``workdir`` (takes about a second)."""
    workdir.mkdir(parents=True, exist_ok=True)
    return TestImages(
        multi_layer=build_multi_layer(workdir / "multi_layer"),
        index=build_index(workdir / "index"),
        docker_v2=build_docker_v2(workdir / "docker_v2"),
    )
