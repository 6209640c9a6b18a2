"""`[[follow]]` patterns: which pushed tags a follow takes, and what a poller may ask upstream.

A pattern is `registry/repository:tag`, each part a glob: `*` stands for any run of characters
and `?` for one, and neither crosses a `/` (`team/*` takes `team/app`, not `team/app/debug`).
Nothing else is special: `[` is a literal character, as it must be for an IPv6 registry.

The registry part is always there. The first component is the registry even when it holds a
wildcard, so `*/team/app:prod-*` means "`team/app` on any registry"; a literal first component
that cannot be a registry host (`team/app:*`, no dot, port or `localhost`) is refused rather
than read as Docker Hub's `team/app`, because with globs the shorthand turns ambiguous: is
`team*/app:*` a namespace glob on Docker Hub or a host glob? Docker Hub's one-word names are
normalised as `docker pull` reads them, as push events and polls name them:
`docker.io/nginx:*` is `docker.io/library/nginx:*`.

Registries compare without regard to case (host names do not have one); repositories and tags
compare exactly.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from mirror.errors import NameInvalid
from mirror.oci.reference import (
    DEFAULT_REGISTRY,
    is_registry,
    validate_registry,
    validate_repository,
    validate_tag,
)
from mirror.prefetch.model import Follow, ImageRef

_WILDCARDS = frozenset("*?")
# A wildcard part is checked against the grammar with its wildcards standing for these: a part
# that is invalid however its wildcards are filled can match nothing, and is a typo.
_FILLERS = ("a", "1")


@dataclass(frozen=True, slots=True)
class FollowPattern:
    """A follow's `match`, parsed and normalised: `str(pattern)` is what `Follow.match` holds."""

    registry: str
    repository: str
    tag: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"

    @property
    def pollable(self) -> bool:
        """Registry and repository are literal: a poller knows which tag list to ask for."""
        return not (has_wildcards(self.registry) or has_wildcards(self.repository))

    def matches(self, ref: ImageRef) -> bool:
        """`ref` has a tag and each of its parts matches; a digest-only ref matches nothing."""
        if ref.tag is None:
            return False
        registry, repository, tag = _compiled(self)
        return bool(
            registry.fullmatch(ref.registry)
            and repository.fullmatch(ref.repository)
            and tag.fullmatch(ref.tag)
        )

    def matches_tag(self, tag: str) -> bool:
        """The tag part alone: what a poller keeps of a repository's tag list."""
        return _compiled(self)[2].fullmatch(tag) is not None


def has_wildcards(text: str) -> bool:
    return not _WILDCARDS.isdisjoint(text)


def parse_follow_match(text: str) -> FollowPattern:
    """A `match` as the prefetch file gives it; `NameInvalid` with the reason if not one."""
    try:
        return _parse(text.strip())
    except NameInvalid as exc:
        raise NameInvalid(f"{text!r} is not a registry/repository:tag pattern: {exc}") from None


def follow_matches(follow: Follow, ref: ImageRef) -> bool:
    """Whether a pushed (or polled) `ref` is one `follow` takes.

    `follow.match` comes from `parse_follow_match` (the prefetch file's loader checks it); a
    match that is not a pattern raises `NameInvalid` rather than silently matching nothing.
    """
    return follow_pattern(follow.match).matches(ref)


@functools.lru_cache(maxsize=1024)
def follow_pattern(match: str) -> FollowPattern:
    """`parse_follow_match`, remembered: every push event is matched against every follow."""
    return parse_follow_match(match)


def _parse(text: str) -> FollowPattern:
    if not text:
        raise NameInvalid("it is empty")
    if "@" in text:
        raise NameInvalid("a follow takes tags, not digests")
    registry, slash, rest = text.partition("/")
    if not slash or not rest:
        raise NameInvalid("it has no repository")
    repository, colon, tag = rest.rpartition(":")
    if not colon or "/" in tag:
        raise NameInvalid("it has no :tag (write :* for every tag)")
    _check_registry(registry)
    if registry.lower() == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    _check_part(repository, validate_repository, "repository")
    _check_part(tag, validate_tag, "tag")
    return FollowPattern(registry, repository, tag)


def _check_registry(registry: str) -> None:
    if has_wildcards(registry):
        _check_part(registry, validate_registry, "registry")
        return
    looks_like_host = "." in registry or ":" in registry or registry == "localhost"
    if not (looks_like_host and is_registry(registry)):
        raise NameInvalid(
            f"{registry!r} is not a registry host: the pattern starts with the registry "
            f"(docker.io/{registry}/...)"
        )


def _check_part(text: str, validate: Callable[[str], str], what: str) -> None:
    if not text:
        raise NameInvalid(f"the {what} is empty")
    for filler in _FILLERS:
        try:
            validate(text.replace("*", filler).replace("?", filler))
        except NameInvalid:
            continue
        return
    raise NameInvalid(f"invalid {what} {text!r}")


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: FollowPattern) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    return (
        re.compile(_regex(pattern.registry), re.IGNORECASE),
        re.compile(_regex(pattern.repository)),
        re.compile(_regex(pattern.tag)),
    )


def _regex(glob: str) -> str:
    return "".join(
        "[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char) for char in glob
    )
