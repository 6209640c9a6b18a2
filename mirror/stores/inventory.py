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
    for entry in await store.images():
        if await _walk_manifest(store, entry.digest, inventory, depth=0):
            inventory.tags.add(str(entry.ref))
    inventory.digests.update(await store.loose_digests())
    return inventory


async def _walk_manifest(store: Store, digest: Digest, inventory: Inventory, depth: int) -> bool:
    """Add a manifest and what it references that is present; False if the manifest is absent."""
    if str(digest) in inventory.digests:
        return True
    try:
        found = await read_manifest(store, digest)
    except ManifestUnknown:
        return False
    if found is None:
        return False
    body, media_type = found
    inventory.digests.add(str(digest))
    for child_text in children_of(body):
        try:
            child = parse_digest(child_text)
        except DigestInvalid:
            continue
        if media_type in INDEX_TYPES and depth < 2:
            await _walk_manifest(store, child, inventory, depth + 1)
        elif await store.stat(child) is not None:
            inventory.digests.add(str(child))
    return True
