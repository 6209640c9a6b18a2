"""Mirror URLs as runtimes take them: an origin, compared without case or trailing slash."""

from __future__ import annotations

from mirror.upstream.registries import parse_origin

DEFAULT_MIRROR = "http://127.0.0.1:5000"


def parse_mirror_url(text: str) -> str:
    """`http(s)://HOST[:PORT]`: the registry API of a mirror node lives at `/v2/` below it.

    A path would send containerd to `<path>/v2/` and dockerd to a prefix the node does not
    serve, so it is refused here rather than discovered as 404s at the first pull.
    """
    return parse_origin(
        text.strip(), f"mirror {text!r}", credentials_problem="URL must not carry credentials"
    )


def same_endpoint(a: str, b: str) -> bool:
    """Whether two URLs name one endpoint (dockerd itself adds a trailing slash to mirrors)."""
    return endpoint_key(a) == endpoint_key(b)


def endpoint_key(url: str) -> str:
    """A comparison key: lower case, no trailing slash, `https://` when the scheme is missing
    (containerd's reading of a `[host."name"]` without one)."""
    text = url.strip().rstrip("/").lower()
    return text if "://" in text else "https://" + text
