"""Registry authentication: parse challenges, fetch and cache bearer tokens, answer Basic.

The distribution token flow: a request without a (valid) token gets `401` with
`WWW-Authenticate: Bearer realm="...",service="...",scope="..."`; the client GETs the realm with
`service` and `scope` as query parameters (with Basic credentials when it has some, anonymously
otherwise), receives `{"token": ...}` (or `access_token`) valid `expires_in` seconds, and repeats
the request with `Authorization: Bearer <token>`.

Tokens are cached per (registry, scope) until shortly before they expire, and the challenge a
repository answered with is remembered, so later requests carry a token from the start instead of
paying a 401 round trip each time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from mirror.errors import UpstreamAuthError, UpstreamError
from mirror.metrics import Metrics
from mirror.upstream.credentials import Credentials, basic_authorization
from mirror.upstream.registries import UpstreamMap

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0
# A token is dropped this long before it expires (at most), so it never dies in flight.
_EXPIRY_MARGIN = 30.0
_MAX_TOKEN_RESPONSE = 1024 * 1024
_PRUNE_ABOVE = 1024

# RFC 9110 grammar: token, quoted-string, token68.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_TOKEN_RE = re.compile(_TOKEN)
_PARAM_RE = re.compile(rf"({_TOKEN})[ \t]*=[ \t]*({_QUOTED}|{_TOKEN})")
_TOKEN68_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*(?=[ \t]*(?:,|$))")
_ESCAPE_RE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Challenge:
    """One challenge of a `WWW-Authenticate` header: scheme (lowercase) and its parameters."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)
    token68: str | None = None


def parse_www_authenticate(values: Iterable[str]) -> list[Challenge]:
    """Every challenge in the given header values, in order.

    A header may hold several challenges and parameter values may be quoted strings containing
    commas (`scope="repository:a:pull,push"`), so splitting on commas is wrong. Unparseable
    fragments are skipped rather than failing the whole header.
    """
    challenges: list[Challenge] = []
    for value in values:
        challenges.extend(_parse_header(value))
    return challenges


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _parse_header(text: str) -> list[Challenge]:
    found: list[tuple[str, dict[str, str], str | None]] = []
    pos = 0
    while (pos := _skip(text, pos, " \t,")) < len(text):
        if found and (param := _PARAM_RE.match(text, pos)):
            name, raw = param.group(1).lower(), param.group(2)
            if raw.startswith('"'):
                raw = _ESCAPE_RE.sub(r"\1", raw[1:-1])
            found[-1][1].setdefault(name, raw)
            pos = param.end()
            continue
        scheme = _TOKEN_RE.match(text, pos)
        if scheme is None:
            # Garbage: resume after the next comma.
            comma = text.find(",", pos)
            if comma < 0:
                break
            pos = comma + 1
            continue
        pos = scheme.end()
        token68: str | None = None
        after = _skip(text, pos, " \t")
        if after > pos and not _PARAM_RE.match(text, after):
            t68 = _TOKEN68_RE.match(text, after)
            if t68 is not None:
                token68, pos = t68.group(0), t68.end()
        found.append((scheme.group(0).lower(), {}, token68))
    return [Challenge(scheme, params, token68) for scheme, params, token68 in found]


@dataclass(frozen=True, slots=True)
class BearerChallenge:
    realm: str
    service: str | None
    scope: str | None


@dataclass(frozen=True, slots=True)
class _Token:
    header: str
    expires_at: float


class Authenticator:
    """Finds the `Authorization` header for a request to an upstream registry.

    One per `UpstreamClient`; it shares the client's session. Concurrent requests needing the
    same token wait for one fetch instead of each asking the token service.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        registries: UpstreamMap,
        credentials: Credentials | None,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout: float | None = None,
    ) -> None:
        """`timeout` bounds one token fetch, its small body included (None: the session's
        own timeouts only)."""
        self._session = session
        self._registries = registries
        self._credentials = credentials
        self._metrics = metrics
        self._clock = clock
        self._timeout = timeout
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._challenges: dict[tuple[str, str], BearerChallenge] = {}
        self._basic: set[str] = set()

    async def authorization(self, registry: str, repository: str) -> str | None:
        """The header to send up front, from what earlier challenges taught; None if unknown."""
        if registry in self._basic:
            return self._basic_header(registry)
        challenge = self._challenges.get((registry, repository))
        if challenge is None:
            return None
        return await self._bearer_header(registry, challenge, rejected=None)

    async def answer(
        self,
        registry: str,
        repository: str,
        www_authenticate: Iterable[str],
        rejected: str | None,
    ) -> str:
        """The header to retry with after a 401 that carried `www_authenticate`.

        `rejected` is the header the 401 answered (None if the request had none): a cached token
        that was just refused is not offered again.
        """
        challenges = parse_www_authenticate(www_authenticate)
        for challenge in challenges:
            if challenge.scheme == "bearer" and challenge.params.get("realm"):
                bearer = BearerChallenge(
                    realm=challenge.params["realm"],
                    service=challenge.params.get("service"),
                    scope=challenge.params.get("scope"),
                )
                self._challenges[(registry, repository)] = bearer
                self._basic.discard(registry)
                return await self._bearer_header(registry, bearer, rejected=rejected)
        if any(c.scheme == "basic" for c in challenges):
            header = self._basic_header(registry)
            if rejected == header:
                raise UpstreamAuthError(f"{registry} refused the configured credentials")
            self._basic.add(registry)
            return header
        schemes = ", ".join(c.scheme for c in challenges) or "none"
        raise UpstreamAuthError(f"{registry} demands authentication we cannot give ({schemes})")

    def _basic_header(self, registry: str) -> str:
        found = self._credentials.lookup(registry) if self._credentials else None
        if found is None:
            raise UpstreamAuthError(f"{registry} demands Basic credentials and none are configured")
        return basic_authorization(*found)

    async def _bearer_header(
        self, registry: str, challenge: BearerChallenge, *, rejected: str | None
    ) -> str:
        key = (registry, challenge.scope or "")
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached and cached.expires_at > self._clock() and cached.header != rejected:
                return cached.header
            token = await self._fetch_token(registry, challenge)
            self._prune()
            self._tokens[key] = token
            return token.header

    def _prune(self) -> None:
        if len(self._tokens) < _PRUNE_ABOVE:
            return
        now = self._clock()
        for key in [k for k, t in self._tokens.items() if t.expires_at <= now]:
            del self._tokens[key]
            lock = self._locks.get(key)
            if lock is not None and not lock.locked():
                del self._locks[key]

    async def _fetch_token(self, registry: str, challenge: BearerChallenge) -> _Token:
        try:
            token = await self._request_token(registry, challenge)
        except (UpstreamError, asyncio.CancelledError):
            # Cancelled: mostly the request's deadline (the client's response timeout) ran out.
            self._metrics.token_fetches.labels("error").inc()
            raise
        self._metrics.token_fetches.labels("ok").inc()
        return token

    async def _request_token(self, registry: str, challenge: BearerChallenge) -> _Token:
        try:
            realm = URL(challenge.realm)
        except ValueError:
            raise UpstreamAuthError(f"{registry}: bad token realm {challenge.realm!r}") from None
        if realm.scheme not in ("http", "https") or not realm.host:
            raise UpstreamAuthError(f"{registry}: bad token realm {challenge.realm!r}")
        query: list[tuple[str, str]] = list(realm.query.items())
        if challenge.service:
            query.append(("service", challenge.service))
        # Several scopes come space separated; token services expect one parameter each.
        query.extend(("scope", scope) for scope in (challenge.scope or "").split())
        url = realm.with_query(query)

        headers = {"Accept": "application/json"}
        found = self._credentials.lookup(registry) if self._credentials else None
        if found is not None:
            registry_is_plain = self._registries.base_url(registry).startswith("http://")
            if realm.scheme == "https" or registry_is_plain:
                # aiohttp drops this header if the realm redirects to another origin.
                headers["Authorization"] = basic_authorization(*found)
            else:
                log.warning(
                    "not sending %s credentials to plain-HTTP token realm %s", registry, realm
                )

        started = self._clock()
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session.get(url, headers=headers) as response:
                    body = await response.content.read(_MAX_TOKEN_RESPONSE + 1)
                    status = response.status
        except TimeoutError:
            raise UpstreamError(
                f"{registry}: token service {realm.origin()} did not answer"
                + (f" within {self._timeout:g}s" if self._timeout is not None else "")
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"{registry}: token service {realm.origin()} failed: {exc}"
            ) from None
        if status in (401, 403):
            who = "the configured credentials" if "Authorization" in headers else "anonymous access"
            raise UpstreamAuthError(f"{registry}: token service refused {who} ({status})")
        if status != 200:
            raise UpstreamError(f"{registry}: token service answered {status}")
        if len(body) > _MAX_TOKEN_RESPONSE:
            raise UpstreamError(f"{registry}: token response larger than 1 MiB")
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise UpstreamError(f"{registry}: token response is not JSON") from None
        if not isinstance(document, dict):
            raise UpstreamError(f"{registry}: token response is not a JSON object")
        value = document.get("token") or document.get("access_token")
        if not isinstance(value, str) or not value:
            raise UpstreamError(f"{registry}: token response carries no token")
        lifetime = document.get("expires_in")
        if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        margin = min(_EXPIRY_MARGIN, lifetime / 5)
        return _Token(header=f"Bearer {value}", expires_at=started + lifetime - margin)
