"""The map of every error mirror raises on purpose.

    MirrorError
    ├── ConfigError            a flag, variable or file that cannot be used (one CLI line)
    │   └── PrefetchFileError  a prefetch file entry that cannot be used: line and reason
    ├── StoreUnavailable       a store backend cannot be reached (503 on the wire)
    │   ├── CacheFull          the cache's disk cannot take a write (the blob streams through)
    │   └── DownloadFailed, DownloadAbandoned      (content/downloads.py)
    ├── ContentVanished        a blob went away while it was read (a miss, not an outage)
    ├── DigestMismatch         bytes did not hash to their digest
    ├── BodyTooLarge           a body read whole was over its cap
    ├── PeerUnavailable        no peer could deliver what the router listed
    ├── UpstreamError          an upstream registry could not answer
    │   └── UpstreamAuthError  ...because it refused our credentials
    ├── DhtError               the DHT (routing/errors.py), and rejected datagrams by reason
    ├── RuntimeImportError     the runtime (containerd, dockerd) refused or failed an import
    └── RegistryError          an answer to the client, as OCI error JSON: code and status
        ├── BlobUnknown, ManifestUnknown, NameUnknown                        404
        ├── NameInvalid, DigestInvalid, PaginationInvalid                    400
        ├── Unauthorized 401, Denied 403, Unsupported 405, EndpointUnknown 404
        ├── RequestInvalid 400    a body the mirror's own API cannot use
        ├── RangeNotSatisfiable 416
        ├── TooManyRequests 429   a peer asked past --max-uploads (it asks another holder)
        └── ServiceUnavailable 503

Only `RegistryError` carries an HTTP status; the HTTP front turns the others into one of those
(`registry/api.py`), so grammar, store and client code never decide a status.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class MirrorError(Exception):
    """Base of every error mirror raises on purpose."""


class ConfigError(MirrorError):
    """A flag, environment variable or file that cannot be used as given."""


class StoreUnavailable(MirrorError):
    """A store backend (containerd socket, cache directory) cannot be reached or used."""


class CacheFull(StoreUnavailable):
    """The cache's disk has no room left for a write, and evicting cannot make enough."""


class ContentVanished(MirrorError):
    """A blob that was opened is gone before all of it was read (containerd's GC took it).

    Only a stream can raise it; an open file keeps its bytes. It is a miss, not an outage:
    a manifest read ends as "not held", a blob response is cut.
    """


class DigestMismatch(MirrorError):
    """Bytes did not hash to the digest they were fetched or written under."""


class BodyTooLarge(MirrorError):
    """A response body that must be read whole is larger than its cap."""


class PeerUnavailable(MirrorError):
    """No peer could deliver content that the DHT said it held."""


class UpstreamError(MirrorError):
    """The upstream registry could not answer: unreachable, too slow, 5xx, refused our auth.

    Distinct from "it answered that the content does not exist", which the client reports as
    None, so a caller can tell a 404 it may pass on from an outage it must not cache.
    """


class UpstreamAuthError(UpstreamError):
    """The registry or its token service refused us (no or wrong credentials, token denied).

    Docker Hub also answers this way, rather than 404, for a repository that does not exist
    or is private, so it is not proof of an outage.
    """


class PrefetchFileError(ConfigError):
    """A prefetch file that cannot be used; the node keeps the pins it had.

    `line` is the 1-based line of the offending entry when one can be named.
    """

    def __init__(self, path: str, reason: str, *, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


class RuntimeImportError(MirrorError):
    """The node's runtime could not take an image (its API refused, unpacking failed)."""


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


class RequestInvalid(RegistryError):
    """A request to the mirror's own API (`/mirror/v1/...`) whose body cannot be used."""

    code = "UNSUPPORTED"
    status = 400


class TooManyRequests(RegistryError):
    """A peer's blob request while this node already sends `--max-uploads` bodies to peers.

    Refused at once, before any store is asked, so the fetcher loses one round trip and goes
    on to another holder of the blob (`peers/fetcher.py`) instead of sharing a full uplink.
    The code is the distribution spec's `TOOMANYREQUESTS`; `retry_after` (seconds) goes out
    as `Retry-After`, how long the fetcher should prefer other holders.
    """

    code = "TOOMANYREQUESTS"
    status = 429

    def __init__(
        self, message: str, *, retry_after: int, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        # More headers of the answer (a referral to other providers: peers/referrals.py).
        self.headers = dict(headers or {})


class RangeNotSatisfiable(RegistryError):
    code = "RANGE_INVALID"
    status = 416

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message)
        self.size = size
