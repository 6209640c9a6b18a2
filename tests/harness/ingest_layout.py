"""containerd's content directory with one ingest under way, written by hand (containerd 1.6's
layout: `ingest/<hash>/{ref,total,data}`, then a commit that renames `data` to
`blobs/sha256/<hex>`), so each step of an ingest's life can be taken one at a time.

The code that reads it is shown against a real containerd pull in test_e2e_redirect.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mirror.oci.reference import Digest, parse_digest


class IngestLayout:
    """`root` as a content directory whose runtime is receiving `blob` in `namespace`."""

    def __init__(
        self, root: Path, blob: bytes, namespace: str = "k8s.io", *, total: bool = True
    ) -> None:
        self.blob = blob
        self.digest: Digest = parse_digest("sha256:" + hashlib.sha256(blob).hexdigest())
        self.root = root
        self.ingest = root / "ingest" / hashlib.sha256(b"any").hexdigest()
        self.ingest.mkdir(parents=True)
        (self.ingest / "ref").write_text(f"{namespace}/7/layer-{self.digest}")
        if total:
            (self.ingest / "total").write_text(str(len(blob)))
        (self.ingest / "data").write_bytes(b"")
        self.committed = root / "blobs" / "sha256" / self.digest.hex

    def write(self, upto: int) -> None:
        """Append the blob's bytes up to `upto`, as the runtime receives them."""
        data = self.ingest / "data"
        start = data.stat().st_size
        with open(data, "ab") as file:
            file.write(self.blob[start:upto])

    def commit(self) -> None:
        """What containerd does once the bytes hashed to the digest: `data` becomes the blob."""
        self.committed.parent.mkdir(parents=True, exist_ok=True)
        (self.ingest / "data").rename(self.committed)
        self.drop()

    def drop(self) -> None:
        """The ingest directory removed (given up, or committed), whatever it still holds."""
        for name in ("ref", "total", "data"):
            (self.ingest / name).unlink(missing_ok=True)
        self.ingest.rmdir()
