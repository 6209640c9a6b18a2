"""The HTTP front: the OCI distribution pull API on aiohttp."""
