"""Cluster key, peer request and URL signatures, and the config parsers that feed them."""

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mirror.clusterkey import FRESHNESS_SECONDS, ClusterKey
from mirror.config import parse_cidr, parse_duration
from mirror.errors import ConfigError
from mirror.peers.auth import (
    REDIRECT_LIFETIME,
    RequestSigner,
    RequestVerifier,
    UrlSigner,
    UrlVerifier,
    carries_url_signature,
)

KEY = ClusterKey.from_text(ClusterKey.generate())


def test_signature_round_trip_and_single_use() -> None:
    header = RequestSigner(KEY).sign("GET", "/v2/a/blobs/sha256:00?ns=x")
    verifier = RequestVerifier(KEY)
    assert verifier.verify(header, "GET", "/v2/a/blobs/sha256:00?ns=x")
    assert not verifier.verify(header, "GET", "/v2/a/blobs/sha256:00?ns=x"), "replay accepted"


@pytest.mark.parametrize(
    ("method", "path"),
    [("HEAD", "/v2/a/blobs/sha256:00?ns=x"), ("GET", "/v2/a/blobs/sha256:00?ns=y")],
)
def test_signature_covers_method_and_query(method: str, path: str) -> None:
    header = RequestSigner(KEY).sign("GET", "/v2/a/blobs/sha256:00?ns=x")
    assert not RequestVerifier(KEY).verify(header, method, path)


def test_stale_and_foreign_signatures_are_refused() -> None:
    old = RequestSigner(KEY).sign("GET", "/v2/", now=time.time() - FRESHNESS_SECONDS - 5)
    assert not RequestVerifier(KEY).verify(old, "GET", "/v2/")
    other_key = ClusterKey.from_text(ClusterKey.generate())
    foreign = RequestSigner(other_key).sign("GET", "/v2/")
    assert not RequestVerifier(KEY).verify(foreign, "GET", "/v2/")


@pytest.mark.parametrize(
    "header",
    [
        "",
        "v1",
        "v2 1 2 3",
        "v1 x n AAAA",
        "v1 1 n !!!",
        "v1 1 2 3 4",
        "v1 \u00b2 n AAAA",  # a digit to str.isdigit, not to int()
        f"v1 {'9' * 400} n AAAA",  # an int, but too large for a float
        f"v1 {'9' * 5000} n AAAA",  # too long for int()
        "v1 1 n \u00e9\u00e9\u00e9\u00e9",
    ],
)
def test_malformed_signatures_are_refused(header: str) -> None:
    assert not RequestVerifier(KEY).verify(header, "GET", "/v2/")


def test_a_mac_covers_each_part_with_its_length() -> None:
    """The MAC every node checks (datagrams, signed requests and URLs): HMAC-SHA256 of each
    part prefixed with its 4-byte length, so a node of another version agrees, and moving
    bytes from one part to the next changes it."""
    key = KEY.purpose("dht")
    expected = hmac.new(key._secret, digestmod=hashlib.sha256)
    for part in (b"payload", b"", b"stamp"):
        expected.update(len(part).to_bytes(4, "big") + part)
    assert key.mac(b"payload", b"", b"stamp") == expected.digest()
    assert key.mac(b"payloa", b"d", b"stamp") != expected.digest()
    assert key.verify(expected.digest(), b"payload", b"", b"stamp")


def test_dht_and_http_keys_are_separated() -> None:
    assert KEY.purpose("dht").mac(b"x") != KEY.purpose("http").mac(b"x")
    assert KEY.purpose("redirect").mac(b"x") != KEY.purpose("http").mac(b"x")


# --- signed URLs (--peer-transfer=redirect) ---------------------------------------------------

HOLDER = "10.0.0.7:5000"
BLOB_PATH = "/v2/library/app/blobs/sha256:" + "ab" * 32 + "?ns=docker.io"


def test_url_signature_round_trip_and_single_use() -> None:
    url = UrlSigner(KEY).sign("GET", HOLDER, BLOB_PATH)
    assert url.startswith(BLOB_PATH + "&mirror-expires=")
    verifier = UrlVerifier(KEY, HOLDER)
    assert verifier.verify("GET", url)
    assert not verifier.verify("GET", url), "replay accepted"
    assert verifier.verify("GET", UrlSigner(KEY).sign("GET", HOLDER, BLOB_PATH))
    bare = UrlSigner(KEY).sign("GET", HOLDER, "/v2/a/blobs/sha256:00")
    assert "/v2/a/blobs/sha256:00?mirror-expires=" in bare
    assert verifier.verify("GET", bare)


@pytest.mark.parametrize(
    ("method", "holder", "path"),
    [
        ("HEAD", HOLDER, BLOB_PATH),
        ("GET", "10.0.0.8:5000", BLOB_PATH),
        ("GET", HOLDER, BLOB_PATH.replace("ns=docker.io", "ns=ghcr.io")),
        ("GET", HOLDER, BLOB_PATH.replace("library/app", "library/other")),
    ],
)
def test_url_signature_covers_method_holder_path_and_query(
    method: str, holder: str, path: str
) -> None:
    """Signed for GET of BLOB_PATH at HOLDER; anything else is refused."""
    signed = UrlSigner(KEY).sign("GET", HOLDER, BLOB_PATH)
    moved = path + signed[len(BLOB_PATH) :]
    assert not UrlVerifier(KEY, holder).verify(method, moved)


def test_url_signatures_expire() -> None:
    now = time.time()
    url = UrlSigner(KEY).sign("GET", HOLDER, BLOB_PATH, now=now)
    assert not UrlVerifier(KEY, HOLDER).verify("GET", url, now=now + REDIRECT_LIFETIME + 0.01)
    assert UrlVerifier(KEY, HOLDER).verify("GET", url, now=now + REDIRECT_LIFETIME - 0.01)
    # A holder whose clock runs behind the signer's by up to the freshness window still takes it.
    early = UrlSigner(KEY).sign("GET", HOLDER, BLOB_PATH, now=now + FRESHNESS_SECONDS - 1)
    assert UrlVerifier(KEY, HOLDER).verify("GET", early, now=now)
    # An expiry further ahead than any signer sets it is refused (and never remembered).
    far = UrlSigner(KEY, lifetime=REDIRECT_LIFETIME + FRESHNESS_SECONDS + 5).sign(
        "GET", HOLDER, BLOB_PATH, now=now
    )
    assert not UrlVerifier(KEY, HOLDER).verify("GET", far, now=now)


def test_a_used_url_is_remembered_until_it_expires_and_no_longer() -> None:
    now = time.time()
    verifier = UrlVerifier(KEY, HOLDER)
    url = UrlSigner(KEY).sign("GET", HOLDER, BLOB_PATH, now=now)
    assert verifier.verify("GET", url, now=now)
    assert not verifier.verify("GET", url, now=now + REDIRECT_LIFETIME - 1)
    # Past its expiry another URL's check forgets it (it is refused as expired anyway).
    later = now + REDIRECT_LIFETIME + 1
    assert verifier.verify(
        "GET", UrlSigner(KEY).sign("GET", HOLDER, BLOB_PATH, now=later), now=later
    )
    assert len(verifier._replays) == 1


def test_foreign_and_cross_purpose_url_signatures_are_refused() -> None:
    other = ClusterKey.from_text(ClusterKey.generate())
    assert not UrlVerifier(KEY, HOLDER).verify(
        "GET", UrlSigner(other).sign("GET", HOLDER, BLOB_PATH)
    )
    # The same fields MACed under the header-signature key do not make a URL signature.
    expires, nonce = str(int((time.time() + 10) * 1000)), "0123456789abcdef01234567"
    parts = (b"GET", HOLDER.encode(), BLOB_PATH.encode(), expires.encode(), nonce.encode())
    mac = base64.urlsafe_b64encode(KEY.purpose("http").mac(*parts)).decode().rstrip("=")
    url = f"{BLOB_PATH}&mirror-expires={expires}&mirror-nonce={nonce}&mirror-sig={mac}"
    assert not UrlVerifier(KEY, HOLDER).verify("GET", url)
    good = base64.urlsafe_b64encode(KEY.purpose("redirect").mac(*parts)).decode().rstrip("=")
    assert UrlVerifier(KEY, HOLDER).verify("GET", url.replace(mac, good)), "the test is wrong"
    # And a URL signature is no header signature.
    header = (
        f"v1 {expires} {nonce} " + base64.b64encode(KEY.purpose("redirect").mac(*parts)).decode()
    )
    assert not RequestVerifier(KEY).verify(header, "GET", BLOB_PATH)


def _signed_parts() -> tuple[str, str, str, str]:
    url = UrlSigner(KEY).sign("GET", HOLDER, BLOB_PATH)
    query = dict(part.split("=", 1) for part in url.split("?", 1)[1].split("&"))
    return query["mirror-expires"], query["mirror-nonce"], query["mirror-sig"], url


@pytest.mark.parametrize(
    "mangle",
    [
        lambda e, n, s, url: url[:-2] + ("A" if url[-2] != "A" else "B") + url[-1],  # forged
        lambda e, n, s, url: url + "&x=1",  # a parameter after the signature
        lambda e, n, s, url: url.replace("&mirror-expires", "?mirror-expires"),
        lambda e, n, s, url: f"{BLOB_PATH}&mirror-nonce={n}&mirror-expires={e}&mirror-sig={s}",
        lambda e, n, s, url: f"{BLOB_PATH}&mirror-expires={e}&mirror-sig={s}",
        lambda e, n, s, url: (
            f"{BLOB_PATH}&mirror-expires={e}&mirror-nonce={n.upper()}&mirror-sig={s}"
        ),
        lambda e, n, s, url: (
            f"{BLOB_PATH}&mirror-expires={'9' * 16}&mirror-nonce={n}&mirror-sig={s}"
        ),
        lambda e, n, s, url: (
            f"{BLOB_PATH}&mirror-expires=\u00b2{e}&mirror-nonce={n}&mirror-sig={s}"
        ),
        lambda e, n, s, url: f"{BLOB_PATH}&mirror-expires={e}&mirror-nonce={n}&mirror-sig={s}=",
        lambda e, n, s, url: f"{BLOB_PATH}&mirror-expires={e}&{url.split('&', 1)[1]}",  # twice
        lambda e, n, s, url: url.replace(BLOB_PATH, BLOB_PATH + "&mirror-x=1"),
        lambda e, n, s, url: "",
    ],
)
def test_malformed_url_signatures_are_refused(mangle: Callable[[str, str, str, str], str]) -> None:
    expires, nonce, mac, url = _signed_parts()
    assert not UrlVerifier(KEY, HOLDER).verify("GET", mangle(expires, nonce, mac, url))


def test_only_the_signers_spelling_of_a_mac_is_accepted() -> None:
    """The last base64url character of a 32-byte MAC has 2 unused bits: 4 spellings decode to
    the same bytes. Only the canonical one (unused bits zero) is the signature."""
    url = UrlSigner(KEY).sign("GET", HOLDER, BLOB_PATH)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(url[-1])
    assert last % 4 == 0
    for spare in (1, 2, 3):
        assert not UrlVerifier(KEY, HOLDER).verify("GET", url[:-1] + alphabet[last + spare])
    assert UrlVerifier(KEY, HOLDER).verify("GET", url)


@pytest.mark.parametrize(
    ("target", "claims"),
    [
        ("/v2/a/blobs/sha256:00", False),
        ("/v2/a/blobs/sha256:00?ns=docker.io", False),
        ("/v2/mirror-app/blobs/sha256:00?ns=docker.io", False),  # in the path, not the query
        ("/v2/a/blobs/sha256:00?ns=mirror-x", False),
        ("/v2/a/blobs/sha256:00?mirror-sig=x", True),
        ("/v2/a/blobs/sha256:00?ns=docker.io&mirror-expires=1", True),
        ("/v2/a/blobs/sha256:00?ns=docker.io&mirror-", True),
    ],
)
def test_which_targets_claim_a_url_signature(target: str, claims: bool) -> None:
    assert carries_url_signature(target) is claims


def test_a_signed_target_is_never_signed_again() -> None:
    with pytest.raises(ValueError):
        UrlSigner(KEY).sign("GET", HOLDER, UrlSigner(KEY).sign("GET", HOLDER, BLOB_PATH))


def test_key_files(tmp_path: Path) -> None:
    good = tmp_path / "key"
    good.write_text(ClusterKey.generate() + "\n")
    ClusterKey.load(good)
    with pytest.raises(ConfigError, match="cannot read"):
        ClusterKey.load(tmp_path / "absent")
    short = tmp_path / "short"
    short.write_text("c2hvcnQ")
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        ClusterKey.load(short)
    junk = tmp_path / "junk"
    junk.write_text("not base64 at all!!")
    with pytest.raises(ConfigError):
        ClusterKey.load(junk)
    raw = tmp_path / "raw"
    raw.write_bytes(b"\x90" + bytes(range(31)))
    with pytest.raises(ConfigError, match="raw bytes, not a key's base64 text"):
        ClusterKey.load(raw)


@pytest.mark.parametrize(
    ("text", "seconds"), [("20ms", 0.02), ("1.5s", 1.5), ("10m", 600), ("1h", 3600), ("3", 3)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "fast", "0s", "-1s", "10 minutes"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_cidrs() -> None:
    assert str(parse_cidr("10.1.2.3/8")) == "10.0.0.0/8"
    assert str(parse_cidr("fd00::/8")) == "fd00::/8"
    with pytest.raises(ConfigError):
        parse_cidr("10.0.0.0/33")
