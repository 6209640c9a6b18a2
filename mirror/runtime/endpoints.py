"""Mirror URLs as runtimes take them: an origin, compared without case or trailing slash."""

from __future__ import annotations

from urllib.parse import urlsplit

from mirror.errors import ConfigError

DEFAULT_MIRROR = "http://127.0.0.1:5000"


def parse_mirror_url(text: str) -> str:
    """`http(s)://HOST[:PORT]`: the registry API of a mirror node lives at `/v2/` below it.

    A path would send containerd to `<path>/v2/` and dockerd to a prefix the node does not
    serve, so it is refused here rather than discovered as 404s at the first pull.
    """
    url = text.strip()
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError when out of range or not a number
    except ValueError as exc:
        raise ConfigError(f"mirror {text!r}: bad URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"mirror {text!r}: URL must start with http:// or https://")
    if not parts.hostname:
        raise ConfigError(f"mirror {text!r}: URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"mirror {text!r}: URL must not carry credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.endswith("?"):
        raise ConfigError(f"mirror {text!r}: URL must have no path, query or fragment")
    return f"{parts.scheme}://{parts.netloc}"


def same_endpoint(a: str, b: str) -> bool:
    """Whether two URLs name one endpoint (dockerd itself adds a trailing slash to mirrors)."""
    return endpoint_key(a) == endpoint_key(b)


def endpoint_key(url: str) -> str:
    """A comparison key: lower case, no trailing slash, `https://` when the scheme is missing
    (containerd's reading of a `[host."name"]` without one)."""
    text = url.strip().rstrip("/").lower()
    return text if "://" in text else "https://" + text
