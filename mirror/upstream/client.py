"""The HTTP client for registries outside the cluster: manifests, tag freshness, tag lists and
blobs.

- One `aiohttp` session with no total timeout (a multi-GiB blob may take minutes) but bounded
  connect and per-read waits, and no transparent decompression: blobs are passed on byte for
  byte, as their digest demands.
- Every request's wait for response headers is bounded as a whole (`response_timeout`, the
  `--upstream-timeout` flag): connecting, token fetches, the retry after a `401` and redirects
  included. A registry that accepts the connection and never answers is an `UpstreamError`
  within that time, so a runtime gets its 404 and falls back long before its own timeouts.
- Authentication (bearer tokens, Basic) is delegated to `auth.Authenticator`; a `401` is
  answered once, then it is an `UpstreamAuthError`.
- Redirects are followed here rather than by aiohttp, so the rule is explicit: the registry's
  `Authorization` header goes to the registry's own origin only, never to the storage backend
  (S3, a CDN) a blob is redirected to.
- "Not there" (`404`) is `None`; "could not answer" (unreachable, timeout, `5xx`, refused auth,
  wrong bytes) is `UpstreamError`, so callers never cache an outage as a miss.
- Each registry's health is kept (`health()`, for the status page): when it last answered, and
  when it last could not, with the error (no answer, a `5xx`, refused authentication, a body
  that broke off).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from mirror.bodies import read_capped
from mirror.errors import (
    BodyTooLarge,
    DigestInvalid,
    NameInvalid,
    RangeNotSatisfiable,
    UpstreamAuthError,
    UpstreamError,
)
from mirror.metrics import Metrics
from mirror.oci.mediatypes import MANIFEST_TYPES, MAX_MANIFEST_SIZE, detect_manifest_type
from mirror.oci.reference import (
    Digest,
    is_digest_reference,
    parse_digest,
    validate_registry,
    validate_repository,
    validate_tag,
)
from mirror.ranges import RangeRequest, parse_content_range, unsatisfied_size
from mirror.upstream.auth import Authenticator
from mirror.upstream.credentials import Credentials
from mirror.upstream.registries import UpstreamMap

__all__ = ["Manifest", "ManifestRef", "RegistryHealth", "UpstreamBlob", "UpstreamClient"]

_CHUNK = 1024 * 1024
_MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Enough of an error body to name the OCI error code in the exception message.
_ERROR_BODY_LIMIT = 4096
_MANIFEST_ACCEPT = ", ".join(sorted(MANIFEST_TYPES))
# A tag list is followed through at most this many pages and tags: a `Link` chain that never
# ends, or a repository of generated tags, must cost a bounded amount of time and memory.
MAX_TAG_PAGES = 100
MAX_TAGS = 100_000
_MAX_TAG_PAGE_BYTES = 8 * 1024 * 1024
_USER_AGENT = "mirror/0.1 (+cluster-local OCI registry mirror)"
# Health is kept for this many registries, those not heard of for longest dropped first.
_HEALTH_KEPT = 256


@dataclass(slots=True)
class RegistryHealth:
    """How one upstream registry has been answering (wall-clock times; None: not yet)."""

    last_success: float | None = None
    last_error: float | None = None
    error: str | None = None  # the last error's message


@dataclass(frozen=True)
class ManifestRef:
    """What a `HEAD` tells about a manifest: enough to decide whether a cached tag is fresh."""

    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class Manifest:
    body: bytes
    media_type: str
    digest: str


class UpstreamBlob:
    """An open blob response: headers checked, body not read yet.

    The body is streamed once with `chunks()`; `close()` must be called in every case (it drops
    the connection if the body was not read to the end, so a half-read body is never reused).
    """

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        metrics: Metrics,
        *,
        status: int,
        size: int,
        offset: int,
        length: int,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.status = status
        self.size = size
        self.offset = offset
        self.length = length
        self._response = response
        self._metrics = metrics
        self._on_error = on_error
        self._started = False
        self._result: str | None = None

    def __repr__(self) -> str:
        return (
            f"UpstreamBlob(status={self.status}, size={self.size}, offset={self.offset}, "
            f"length={self.length})"
        )

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (up to 1 MiB per chunk), exactly `length` bytes or an error."""
        if self._started:
            raise RuntimeError("an upstream blob body can be read only once")
        self._started = True
        received = 0
        try:
            async for chunk in self._response.content.iter_chunked(_CHUNK):
                received += len(chunk)
                self._metrics.upstream_bytes.inc(len(chunk))
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._record("error")
            message = (
                f"blob stream from {self._response.url.origin()} broke after {received} "
                f"of {self.length} bytes: {_describe(exc)}"
            )
            if self._on_error is not None:
                self._on_error(message)
            raise UpstreamError(message) from None
        if received != self.length:
            self._record("error")
            message = (
                f"blob stream from {self._response.url.origin()} ended after {received} "
                f"of {self.length} bytes"
            )
            if self._on_error is not None:
                self._on_error(message)
            raise UpstreamError(message)
        self._record("ok")

    async def close(self) -> None:
        if self._result is None:
            # The registry answered; the reader stopped early. That is not an upstream failure.
            self._record("ok")
            self._response.close()
        else:
            self._response.release()

    async def __aenter__(self) -> UpstreamBlob:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _record(self, result: str) -> None:
        if self._result is None:
            self._result = result
            self._metrics.upstream_fetches.labels("blob", result).inc()


class UpstreamClient:
    """Pull-only client for upstream registries; `start()` before use, `close()` after."""

    def __init__(
        self,
        registries: UpstreamMap,
        credentials: Credentials | None,
        metrics: Metrics,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        response_timeout: float = 10.0,
    ) -> None:
        """`response_timeout` bounds the wait for a request's response headers (token fetch,
        `401` retry and redirects included); `read_timeout` bounds each read of a body after
        that, with no total, so a multi-GiB blob is never cut."""
        self._registries = registries
        self._credentials = credentials
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._response_timeout = response_timeout
        self._session: aiohttp.ClientSession | None = None
        self._auth: Authenticator | None = None
        self._health: dict[str, RegistryHealth] = {}

    def health(self) -> dict[str, RegistryHealth]:
        """Each registry asked so far: when it last answered, and last failed (copies)."""
        return {
            registry: RegistryHealth(entry.last_success, entry.last_error, entry.error)
            for registry, entry in sorted(self._health.items())
        }

    def _health_of(self, registry: str) -> RegistryHealth:
        entry = self._health.pop(registry, None) or RegistryHealth()
        self._health[registry] = entry  # the most recently heard of last
        while len(self._health) > _HEALTH_KEPT:
            del self._health[next(iter(self._health))]
        return entry

    def _answered(self, registry: str, status: int) -> None:
        # A 404 is an answer; refused access, a rate limit or a server error are not.
        if status >= 500 or status in (401, 403, 429):
            self._failed(registry, f"answered {status}")
        else:
            self._health_of(registry).last_success = time.time()

    def _failed(self, registry: str, error: str) -> None:
        entry = self._health_of(registry)
        entry.last_error, entry.error = time.time(), error

    async def start(self) -> None:
        # trust_env stays off: it would also pick up ~/.netrc and send those credentials around.
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            auto_decompress=False,
            headers={"User-Agent": _USER_AGENT},
        )
        self._auth = Authenticator(
            self._session,
            self._registries,
            self._credentials,
            self._metrics,
            timeout=self._response_timeout,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
            self._auth = None

    async def __aenter__(self) -> UpstreamClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- manifests -------------------------------------------------------------------------

    async def head_manifest(
        self, registry: str, repository: str, reference: str, *, timeout: float
    ) -> ManifestRef | None:
        """Digest, media type and size of a manifest without its body (tag freshness).

        `timeout` bounds the whole call, token fetch included: a freshness check must not hold
        up a pull that could be served from the cache.
        """
        kind = "manifest" if is_digest_reference(reference) else "tag"
        _validate(registry, repository, reference)
        try:
            async with asyncio.timeout(timeout):
                found = await self._head_manifest(registry, repository, reference)
        except TimeoutError:
            self._metrics.upstream_fetches.labels(kind, "error").inc()
            raise UpstreamError(
                f"{registry}/{repository}:{reference}: no answer within {timeout:g}s"
            ) from None
        except UpstreamError:
            self._metrics.upstream_fetches.labels(kind, "error").inc()
            raise
        self._metrics.upstream_fetches.labels(kind, "ok" if found else "missing").inc()
        return found

    async def get_manifest(self, registry: str, repository: str, reference: str) -> Manifest | None:
        """The manifest's bytes, checked against `reference` when it is a digest."""
        _validate(registry, repository, reference)
        try:
            found = await self._get_manifest(registry, repository, reference)
        except UpstreamError:
            self._metrics.upstream_fetches.labels("manifest", "error").inc()
            raise
        self._metrics.upstream_fetches.labels("manifest", "ok" if found else "missing").inc()
        return found

    async def _head_manifest(
        self, registry: str, repository: str, reference: str
    ) -> ManifestRef | None:
        response = await self._open(
            "HEAD", registry, repository, f"manifests/{reference}", {"Accept": _MANIFEST_ACCEPT}
        )
        try:
            if response.status == 404:
                return None
            if response.status != 200:
                raise await _status_error(response, registry, repository, reference)
            media_type = _media_type(response)
            digest = _header_digest(response)
            size = response.content_length
        finally:
            response.release()
        if is_digest_reference(reference) and digest is not None and digest != reference:
            raise UpstreamError(
                f"{registry}/{repository}@{reference}: registry claims digest {digest}"
            )
        if digest is None or media_type not in MANIFEST_TYPES or size is None:
            # Some registries leave these out of a HEAD; the body tells all of them.
            manifest = await self._get_manifest(registry, repository, reference)
            if manifest is None:
                return None
            return ManifestRef(manifest.digest, manifest.media_type, len(manifest.body))
        return ManifestRef(digest, media_type, size)

    async def _get_manifest(
        self, registry: str, repository: str, reference: str
    ) -> Manifest | None:
        response = await self._open(
            "GET", registry, repository, f"manifests/{reference}", {"Accept": _MANIFEST_ACCEPT}
        )
        try:
            if response.status == 404:
                return None
            if response.status != 200:
                raise await _status_error(response, registry, repository, reference)
            body = await _read_manifest(response, f"{registry}/{repository}:{reference}")
            header_type = _media_type(response)
            claimed = _header_digest(response)
        finally:
            response.release()
        where = f"{registry}/{repository}:{reference}"
        detected = detect_manifest_type(body)
        if detected is None:
            raise UpstreamError(f"{where}: the registry sent something that is not a manifest")
        media_type = header_type if header_type in MANIFEST_TYPES else detected
        if is_digest_reference(reference):
            expected = parse_digest(reference)
            if _hash(expected.algorithm, body) != expected.hex:
                raise UpstreamError(f"{where}: body does not match the digest asked for")
            return Manifest(body, media_type, reference)
        if claimed is not None:
            parsed = parse_digest(claimed)
            if _hash(parsed.algorithm, body) == parsed.hex:
                return Manifest(body, media_type, claimed)
        return Manifest(body, media_type, "sha256:" + _hash("sha256", body))

    # -- tag lists -------------------------------------------------------------------------

    async def list_tags(
        self, registry: str, repository: str, *, page_size: int | None = None
    ) -> list[str] | None:
        """Every tag of the repository, in the registry's order; None when it has no such
        repository (404).

        Pages are followed through `Link: <...>; rel="next"` (the distribution spec's
        pagination; `page_size` asks for pages of that many, None lets the registry choose).
        A list is whole or an `UpstreamError`: past `MAX_TAG_PAGES` pages or `MAX_TAGS` tags,
        a `Link` off the registry's origin (it would get our credentials) or back to a page
        already read, a 404 after the first page. A truncated list would read as tags removed.
        Strings that are not tags by the grammar are left out: no request could name them.
        """
        _validate(registry, repository, None)
        if page_size is not None and page_size < 1:
            raise ValueError(f"page_size must be positive, not {page_size}")
        try:
            found = await self._list_tags(registry, repository, page_size)
        except UpstreamError:
            self._metrics.upstream_fetches.labels("tag", "error").inc()
            raise
        self._metrics.upstream_fetches.labels("tag", "missing" if found is None else "ok").inc()
        return found

    async def _list_tags(
        self, registry: str, repository: str, page_size: int | None
    ) -> list[str] | None:
        where = f"{registry}/{repository} tags/list"
        url = URL(f"{self._registries.base_url(registry)}/v2/{repository}/tags/list", encoded=True)
        if page_size is not None:
            url = url.with_query(n=str(page_size))
        origin, read = url.origin(), {url}
        tags: dict[str, None] = {}  # ordered, without repeats across pages
        for _ in range(MAX_TAG_PAGES):
            response = await self._open_url(
                "GET", registry, repository, "tags/list", url, {"Accept": "application/json"}
            )
            try:
                if response.status == 404 and not tags and len(read) == 1:
                    return None
                if response.status != 200:
                    raise await _status_error(response, registry, repository, "tags/list")
                body = await _read_capped_json(response, _MAX_TAG_PAGE_BYTES, where)
                link = response.links.get("next")
            finally:
                response.release()
            tags.update(dict.fromkeys(_page_tags(body, where)))
            if len(tags) > MAX_TAGS:
                raise UpstreamError(f"{where}: more than {MAX_TAGS} tags")
            following = link.get("url") if link is not None else None
            if not isinstance(following, URL):
                return list(tags)
            if following.origin() != origin:
                raise UpstreamError(f"{where}: next page at another origin {_redact(following)}")
            if following in read:
                raise UpstreamError(f"{where}: the next page is one already read")
            url = following
            read.add(url)
        raise UpstreamError(f"{where}: more than {MAX_TAG_PAGES} pages")

    # -- blobs -----------------------------------------------------------------------------

    async def get_blob(
        self,
        registry: str,
        repository: str,
        digest: Digest,
        requested: RangeRequest | None = None,
    ) -> UpstreamBlob | None:
        """Open the blob (or the `requested` slice of it); None when the registry lacks it.

        A registry that ignores the range answers `200` with the whole blob: `status` says
        which one the caller got. An unsatisfiable range raises `RangeNotSatisfiable`.
        """
        _validate(registry, repository, None)
        headers = {"Range": requested.header()} if requested is not None else {}
        try:
            response = await self._open("GET", registry, repository, f"blobs/{digest}", headers)
        except UpstreamError:
            self._metrics.upstream_fetches.labels("blob", "error").inc()
            raise
        try:
            blob = await self._blob_from(response, registry, repository, str(digest))
        except RangeNotSatisfiable:
            response.release()
            self._metrics.upstream_fetches.labels("blob", "ok").inc()
            raise
        except Exception:
            response.close()
            self._metrics.upstream_fetches.labels("blob", "error").inc()
            raise
        except BaseException:  # cancelled: not the registry's fault, but free the connection
            response.close()
            raise
        if blob is None:
            response.release()
            self._metrics.upstream_fetches.labels("blob", "missing").inc()
        return blob

    async def _blob_from(
        self, response: aiohttp.ClientResponse, registry: str, repository: str, digest: str
    ) -> UpstreamBlob | None:
        where = f"{registry}/{repository}@{digest}"
        status = response.status
        if status == 404:
            return None
        if status == 416:
            size = unsatisfied_size(response.headers.get("Content-Range"))
            raise RangeNotSatisfiable(f"range not satisfiable for {where}", size=size)
        if status not in (200, 206):
            raise await _status_error(response, registry, repository, digest)
        length = response.content_length
        if length is None:
            raise UpstreamError(f"{where}: blob response without Content-Length")
        on_error = functools.partial(self._failed, registry)
        if status == 200:
            return UpstreamBlob(
                response,
                self._metrics,
                status=200,
                size=length,
                offset=0,
                length=length,
                on_error=on_error,
            )
        parsed = parse_content_range(response.headers.get("Content-Range"))
        if parsed is None:
            raise UpstreamError(f"{where}: 206 without a usable Content-Range")
        byte_range, size = parsed
        if byte_range.length != length:
            raise UpstreamError(f"{where}: inconsistent Content-Range and Content-Length")
        return UpstreamBlob(
            response,
            self._metrics,
            status=206,
            size=size,
            offset=byte_range.offset,
            length=length,
            on_error=on_error,
        )

    # -- requests --------------------------------------------------------------------------

    async def _open(
        self,
        method: str,
        registry: str,
        repository: str,
        path: str,
        headers: dict[str, str],
    ) -> aiohttp.ClientResponse:
        """Send a request to `/v2/<repository>/<path>`, authenticating as the registry demands.

        The response's headers must arrive within `response_timeout`, everything before them
        included; its body is read afterwards under the per-read timeout only.
        """
        base = self._registries.base_url(registry)
        url = URL(f"{base}/v2/{repository}/{path}", encoded=True)
        return await self._open_url(method, registry, repository, path, url, headers)

    async def _open_url(
        self,
        method: str,
        registry: str,
        repository: str,
        path: str,
        url: URL,
        headers: dict[str, str],
    ) -> aiohttp.ClientResponse:
        """`_open` at a URL already made (a `Link` to the next page); `path` names it in errors."""
        if self._auth is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        try:
            async with asyncio.timeout(self._response_timeout):
                response = await self._open_within(method, registry, repository, path, url, headers)
        except TimeoutError:
            error = UpstreamError(
                f"{method} {_redact(url)}: no response within {self._response_timeout:g}s"
            )
            self._failed(registry, str(error))
            raise error from None
        except UpstreamError as exc:
            self._failed(registry, str(exc))
            raise
        self._answered(registry, response.status)
        return response

    async def _open_within(
        self,
        method: str,
        registry: str,
        repository: str,
        path: str,
        url: URL,
        headers: dict[str, str],
    ) -> aiohttp.ClientResponse:
        assert self._auth is not None
        authorization = await self._auth.authorization(registry, repository)
        response = await self._send(method, url, headers, authorization)
        # Only a 401 from the registry itself is a challenge; one from a redirect target is not
        # ours to answer.
        if response.status != 401 or response.url.origin() != url.origin():
            return response
        challenges = response.headers.getall("WWW-Authenticate", [])
        response.release()
        authorization = await self._auth.answer(registry, repository, challenges, authorization)
        response = await self._send(method, url, headers, authorization)
        if response.status == 401 and response.url.origin() == url.origin():
            try:
                error = await _status_error(response, registry, repository, path)
            finally:
                response.release()
            raise UpstreamAuthError(f"{registry} refused the authentication it asked for: {error}")
        return response

    async def _send(
        self, method: str, url: URL, headers: dict[str, str], authorization: str | None
    ) -> aiohttp.ClientResponse:
        """One request, following redirects; `Authorization` only ever goes to `url`'s origin."""
        assert self._session is not None
        origin = url.origin()
        for _ in range(_MAX_REDIRECTS + 1):
            sent = dict(headers)
            if authorization is not None and url.origin() == origin:
                sent["Authorization"] = authorization
            try:
                response = await self._session.request(
                    method, url, headers=sent, allow_redirects=False
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamError(f"{method} {_redact(url)}: {_describe(exc)}") from None
            if response.status not in _REDIRECT_STATUSES:
                return response
            location = response.headers.get("Location")
            response.release()
            if not location:
                raise UpstreamError(f"{method} {_redact(url)}: redirect without Location")
            try:
                url = url.join(URL(location))
            except ValueError:
                raise UpstreamError(f"{method} {_redact(url)}: bad redirect Location") from None
            if url.scheme not in ("http", "https") or not url.host:
                raise UpstreamError(f"{method}: redirect to unsupported URL {_redact(url)}")
        raise UpstreamError(f"{method} {_redact(url)}: more than {_MAX_REDIRECTS} redirects")


def _validate(registry: str, repository: str, reference: str | None) -> None:
    """Names go into URLs: check them against the grammar even if the caller already did."""
    validate_registry(registry)
    validate_repository(repository)
    if reference is not None:
        if is_digest_reference(reference):
            parse_digest(reference)
        else:
            validate_tag(reference)


def _media_type(response: aiohttp.ClientResponse) -> str:
    return response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def _header_digest(response: aiohttp.ClientResponse) -> str | None:
    value = response.headers.get("Docker-Content-Digest", "").strip()
    if not value:
        return None
    try:
        return str(parse_digest(value))
    except DigestInvalid:
        return None


def _hash(algorithm: str, body: bytes) -> str:
    return hashlib.new(algorithm, body).hexdigest()


async def _read_manifest(response: aiohttp.ClientResponse, where: str) -> bytes:
    try:
        return await read_capped(response, MAX_MANIFEST_SIZE)
    except BodyTooLarge as exc:
        raise UpstreamError(f"{where}: manifest {exc}") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UpstreamError(f"{_redact(response.url)}: body broke off: {_describe(exc)}") from None


async def _read_capped_json(response: aiohttp.ClientResponse, limit: int, where: str) -> object:
    try:
        return json.loads(await read_capped(response, limit))
    except BodyTooLarge as exc:
        raise UpstreamError(f"{where}: {exc}") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UpstreamError(f"{_redact(response.url)}: body broke off: {_describe(exc)}") from None
    except (ValueError, RecursionError):
        raise UpstreamError(f"{where}: the registry sent something that is not JSON") from None


def _page_tags(body: object, where: str) -> list[str]:
    """The tags of one tags/list page (`"tags": null` is a repository without tags)."""
    if not isinstance(body, dict):
        raise UpstreamError(f"{where}: the answer is not a tag list")
    tags = body.get("tags")
    if tags is None:
        return []
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise UpstreamError(f"{where}: tags is not a list of strings")
    valid: list[str] = []
    for tag in tags:
        try:
            valid.append(validate_tag(tag))
        except NameInvalid:
            continue
    return valid


async def _status_error(
    response: aiohttp.ClientResponse, registry: str, repository: str, what: str
) -> UpstreamError:
    """An error naming the status and, when the body is OCI error JSON, its codes."""
    codes = ""
    if response.method != "HEAD":
        try:
            raw = await response.content.read(_ERROR_BODY_LIMIT)
            document = json.loads(raw)
            names = [e.get("code") for e in document.get("errors", []) if isinstance(e, dict)]
            codes = " " + ",".join(str(n) for n in names if n) if names else ""
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError, TypeError):
            pass
    message = f"{registry}/{repository} {what}: upstream answered {response.status}{codes}"
    if response.status in (401, 403):
        return UpstreamAuthError(message)
    return UpstreamError(message)


def _redact(url: URL) -> str:
    """The URL without its query: presigned storage URLs carry credentials there."""
    return str(url.with_query(None).with_fragment(None))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
