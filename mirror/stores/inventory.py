"""What a store really holds, as the keys a node advertises: digests and tag references.

Runtimes keep only what they need: after a pull of one platform, an index's other manifests are
absent, and Kubernetes distributions often drop compressed layers after unpacking. Every digest is
therefore checked with `stat` before it is counted, so a node never advertises what it cannot
serve.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mirror.errors import DigestInvalid, ManifestUnknown
from mirror.oci.mediatypes import INDEX_TYPES
from mirror.oci.mediatypes import referenced_digests as children_of
from mirror.oci.reference import Digest, parse_digest
from mirror.stores.base import Store
from mirror.stores.manifests import read_manifest


@dataclass(slots=True)
class Inventory:
    digests: set[str] = field(default_factory=set)
    tags: set[str] = field(default_factory=set)

    def keys(self) -> set[str]:
        return self.digests | self.tags


async def take_inventory(store: Store) -> Inventory:
    inventory = Inventory()
    entries = await store.images()
    await _walk_manifests(store, {entry.digest for entry in entries}, inventory, depth=0)
    inventory.tags.update(
        str(entry.ref) for entry in entries if str(entry.digest) in inventory.digests
    )
    inventory.digests.update(await store.loose_digests())
    return inventory


async def _walk_manifests(
    store: Store, manifests: set[Digest], inventory: Inventory, depth: int
) -> None:
    """Add the manifests present and what they reference that is present, a level at a time:
    the store is asked about each level's digests together (`Store.stat_many`), so a walk costs
    a containerd node a few calls, not one per blob."""
    manifests = {digest for digest in manifests if str(digest) not in inventory.digests}
    if not manifests:
        return
    held = await store.stat_many(manifests)
    children: set[Digest] = set()
    nested: set[Digest] = set()
    for digest in sorted(held, key=str):
        try:
            found = await read_manifest(store, digest)
        except ManifestUnknown:
            continue
        if found is None:
            continue
        body, media_type = found
        inventory.digests.add(str(digest))
        for child_text in children_of(body):
            try:
                child = parse_digest(child_text)
            except DigestInvalid:
                continue
            if media_type in INDEX_TYPES and depth < 2:
                nested.add(child)
            else:
                children.add(child)
    blobs = [digest for digest in children if str(digest) not in inventory.digests]
    inventory.digests.update(str(digest) for digest in await store.stat_many(blobs))
    await _walk_manifests(store, nested, inventory, depth + 1)
