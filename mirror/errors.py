"""Error types. Registry errors carry their OCI code and HTTP status for the front to render."""

from __future__ import annotations

from typing import ClassVar


class MirrorError(Exception):
    """Base of every error mirror raises on purpose."""


class ConfigError(MirrorError):
    """A flag, environment variable or file that cannot be used as given."""


class StoreUnavailable(MirrorError):
    """A store backend (containerd socket, cache directory) cannot be reached or used."""


class DigestMismatch(MirrorError):
    """Bytes did not hash to the digest they were fetched or written under."""


class PeerUnavailable(MirrorError):
    """No peer could deliver content that the DHT said it held."""


class RegistryError(MirrorError):
    """An error the registry API reports to its client as OCI error JSON."""

    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, detail: object | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class BlobUnknown(RegistryError):
    code = "BLOB_UNKNOWN"
    status = 404


class ManifestUnknown(RegistryError):
    code = "MANIFEST_UNKNOWN"
    status = 404


class NameUnknown(RegistryError):
    code = "NAME_UNKNOWN"
    status = 404


class NameInvalid(RegistryError):
    code = "NAME_INVALID"
    status = 400


class DigestInvalid(RegistryError):
    code = "DIGEST_INVALID"
    status = 400


class PaginationInvalid(RegistryError):
    code = "PAGINATION_NUMBER_INVALID"
    status = 400


class Unauthorized(RegistryError):
    code = "UNAUTHORIZED"
    status = 401


class Denied(RegistryError):
    code = "DENIED"
    status = 403


class Unsupported(RegistryError):
    code = "UNSUPPORTED"
    status = 405


class EndpointUnknown(RegistryError):
    """A path under /v2/ that the pull API does not define."""

    code = "UNSUPPORTED"
    status = 404


class ServiceUnavailable(RegistryError):
    """The store behind the API (containerd, the cache directory) failed to answer."""

    code = "UNAVAILABLE"
    status = 503


class RangeNotSatisfiable(RegistryError):
    code = "RANGE_INVALID"
    status = 416

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message)
        self.size = size
