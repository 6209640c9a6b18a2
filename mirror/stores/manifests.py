"""Reading a manifest out of any store: bounded in size, its media type detected."""

from __future__ import annotations

from mirror.errors import ContentVanished, ManifestUnknown
from mirror.oci.mediatypes import MAX_MANIFEST_SIZE, detect_manifest_type
from mirror.oci.reference import Digest
from mirror.stores.base import Store


async def read_manifest(store: Store, digest: Digest) -> tuple[bytes, str] | None:
    """(bytes, media type) of a manifest `store` holds; None when it holds no such blob (or it
    vanished while being read).

    Raises `ManifestUnknown` when the blob is held but is no manifest (too large to be one, or
    JSON of another shape), so a layer is never served or walked as a manifest.
    """
    blob = await store.open(digest)
    if blob is None:
        return None
    try:
        if blob.size > MAX_MANIFEST_SIZE:
            raise ManifestUnknown(f"{digest} is too large to be a manifest")
        body = await blob.read_all(MAX_MANIFEST_SIZE)
    except ContentVanished:
        return None
    finally:
        await blob.close()
    media_type = detect_manifest_type(body)
    if media_type is None:
        raise ManifestUnknown(f"{digest} is not a manifest")
    return body, media_type
