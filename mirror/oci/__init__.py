"""OCI facts shared by every layer: reference grammar, digests, media types."""
