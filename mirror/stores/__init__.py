"""Where bytes come from on this node: one `Store` interface, one module per backend."""

from mirror.stores.base import BlobSource, FileBlob, ImageEntry, Store, StreamBlob

__all__ = ["BlobSource", "FileBlob", "ImageEntry", "Store", "StreamBlob"]
