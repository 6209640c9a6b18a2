"""Upstream error types, kept apart so the auth and client modules can share them."""

from __future__ import annotations

from mirror.errors import MirrorError


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
