"""A token service for distribution's ``auth: token``, run in-process on the test's event loop.

It plays the part of ``auth.docker.io``: a registry configured with ``registry_config()``
answers unauthenticated requests with ``401`` and ``WWW-Authenticate: Bearer realm=...``,
and accepts only JWTs this service signed.

What distribution 2.8 demands of a token (``registry/auth/token``):

- The JWT header must name the signing key: ``x5c`` (a certificate chain that verifies
  against ``rootcertbundle``), a ``jwk``, or a libtrust-fingerprint ``kid``. ``x5c`` with one
  self-signed certificate that is also the whole bundle is the simplest; Go accepts a leaf
  that is itself in the root pool.
- ``alg`` RS256 or ES256 (libtrust); ES256 signatures are raw ``r || s``, not DER.
- Claims ``iss`` equal to ``issuer``, ``aud`` equal to ``service`` as a plain string (2.8
  unmarshals ``aud`` into a string: a JSON array makes the token malformed), ``exp`` and
  ``nbf`` (60 s leeway each), and ``access``: ``[{type, name, actions}]``.

The service records every request (user, scopes) so tests can count token fetches and see
whether credentials were sent.
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from .net import free_port

DEFAULT_SERVICE = "mirror-test-registry"
DEFAULT_ISSUER = "mirror-test-token-issuer"


@dataclass(frozen=True)
class TokenRequest:
    """One request the service answered (or refused)."""

    user: str | None  # None: anonymous
    service: str | None
    scopes: tuple[str, ...]
    status: int


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenServer:
    """ES256 token service on ``127.0.0.1:port`` (``realm`` is ``http://127.0.0.1:port/token``).

    Construction makes the key, the self-signed certificate (written to ``cert_path``) and
    picks the port, synchronously, so a registry can be configured before the server runs;
    ``start()``/``stop()`` run it on the current event loop and may be repeated.

    ``users`` maps user name -> password. Basic credentials that do not match are refused
    with ``401``; with ``users=None`` any user/password is accepted (and recorded). Anonymous
    requests get pull access unless ``allow_anonymous`` is false; authenticated ones get
    every action they ask for. ``token_field`` picks the response key (``token`` or
    ``access_token``; both are valid per the spec).
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        users: Mapping[str, str] | None = None,
        allow_anonymous: bool = True,
        expires_in: int = 300,
        token_field: str = "token",
        port: int | None = None,
    ) -> None:
        self.service = service
        self.issuer = issuer
        self.users = users
        self.allow_anonymous = allow_anonymous
        self.expires_in = expires_in
        self.token_field = token_field
        self.port = port or free_port()
        self.requests: list[TokenRequest] = []
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = _self_signed(self._key, issuer)
        base_dir.mkdir(parents=True, exist_ok=True)
        self.cert_path = base_dir / "token-root.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._runner: web.AppRunner | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_config(self) -> str:
        """The ``auth:`` section for ``Registry(extra_config=...)``."""
        return (
            "auth:\n"
            "  token:\n"
            f"    realm: {self.realm}\n"
            f"    service: {self.service}\n"
            f"    issuer: {self.issuer}\n"
            f"    rootcertbundle: {self.cert_path}\n"
        )

    def reset(self) -> None:
        self.requests.clear()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/token", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> TokenServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def issue(self, subject: str, access: list[dict[str, object]]) -> str:
        """A signed JWT for ``subject`` granting ``access`` (``[{type, name, actions}]``)."""
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        der = self._key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return signing_input + "." + _b64url(signature)

    async def _handle(self, request: web.Request) -> web.Response:
        service = request.query.get("service")
        scopes = tuple(request.query.getall("scope", []))
        user = self._authenticate(request.headers.get("Authorization"))
        if user is False or (user is None and not self.allow_anonymous):
            self.requests.append(TokenRequest(None, service, scopes, 401))
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="token"'},
            )
        assert user is not True
        self.requests.append(TokenRequest(user, service, scopes, 200))
        access = [a for a in (_grant(scope, user is not None) for scope in scopes) if a]
        token = self.issue(user or "", access)
        issued = datetime.datetime.now(datetime.UTC).isoformat()
        return web.json_response(
            {self.token_field: token, "expires_in": self.expires_in, "issued_at": issued}
        )

    def _authenticate(self, header: str | None) -> str | bool | None:
        """User name, None for anonymous, False for refused credentials."""
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, colon, password = base64.b64decode(value, validate=True).decode().partition(":")
        except ValueError:
            return False
        if not colon or not user:
            return False
        if self.users is not None and self.users.get(user) != password:
            return False
        return user


def _grant(scope: str, authenticated: bool) -> dict[str, object] | None:
    """``repository:<name>:<actions>`` -> an ``access`` entry; anonymous users may only pull."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name:
        return None
    wanted = [a for a in actions.split(",") if a]
    granted = wanted if authenticated else [a for a in wanted if a == "pull"]
    return {"type": kind, "name": name, "actions": granted}


def _self_signed(key: ec.EllipticCurvePrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
