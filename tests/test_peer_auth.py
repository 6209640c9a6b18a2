"""Cluster key, peer request signatures and the config parsers that feed them."""

import time
from pathlib import Path

import pytest

from mirror.clusterkey import FRESHNESS_SECONDS, ClusterKey
from mirror.config import parse_cidr, parse_duration
from mirror.errors import ConfigError
from mirror.peers.auth import RequestSigner, RequestVerifier

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


def test_dht_and_http_keys_are_separated() -> None:
    assert KEY.purpose("dht").mac(b"x") != KEY.purpose("http").mac(b"x")


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
