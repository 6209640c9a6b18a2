"""How a busy provider sends a fetcher down the swarm instead of serving it itself.

A node that fetches a blob whole from a peer keeps it and serves it to other peers while it
arrives (content/service.py), so it says so in its request: `?...&sharer=<node id>@<address>`
(a query parameter, so the request signature covers it). The provider remembers who is fetching
each blob from it. When a fetcher asks for a blob that `--blob-fanout` sharers already fetch
from it, the provider answers `429` with `X-Mirror-Try: <id>@<address>, ...`: those sharers,
which hold the start of the blob already and get the rest at the provider's pace. The fetcher
asks them first (peers/fetcher.py); one that is at its own fan-out refers it further down.

With a fan-out above 1 (the default is 2) a referral names first the sharers the provider
sends to, a different one first each time, so a late node takes the free place nearest the
holder and the sharers form a tree about log(N) deep. With a fan-out of 1 they form a chain, and
a referral names first the last two sharers the provider referred elsewhere (the chain's far
end, as far as it knows), so a late node joins the chain at its end in a hop or two instead of
walking it from the start (registry/api.py, `UploadSlots`). A node named first may still be
finding its own source: the fetcher waits for it rather than hedging on (up to
`REFERRED_PATIENCE`, 4 s, in case it cannot answer at all), and it answers busy if it has not
started within `PEER_START_WAIT` (3 s, content/service.py).

**Depth is what a rollout waits on.** A node serves the last byte of a blob only once its
runtime committed (verified) it, so the end of a chain of h nodes completes h commits after its
head. Measured at 16 nodes capped at 0.1 CPU each: 0.3-1 s a hop, a chain 15 deep, its end done
5-7 s after its head; a tree of fan-out 2 is 3-6 deep (docs/benchmarks.md, "A tree, not a
chain").

**Hops.** A chain must end at a holder. Every answer to a peer says how far its bytes are from
one: `X-Mirror-Hops: 0` from a node that holds the blob or downloads it from upstream, `h` from
a node serving what its runtime receives, or what it downloads itself, from a node at `h - 1`.
A node learns its own hops from the probe that chose its runtime's source, and serves what its
runtime receives only once it knows them. Hops are fixed when a source is chosen and only ever
grow down a chain, so following one always comes back to a holder: sources can never form a
cycle of nodes passing each other an ingest that nobody fills (what once stalled a 16-node
rollout for the 30 s stall bound). When a node's runtime comes back after its source failed,
the node downloads the blob for it, from a node nearer a holder than the hops its ingest was
served at: the ingest now waits on that download, so a source further down might be fed by it.

So a rollout where every node asks the one holder at once becomes a tree in a few round trips:
every node downloads the blob once, a node where the tree branches uploads it twice and a leaf
not at all, and the holder's link is no longer shared N ways. A busy node refers at its
`--max-uploads` bound too, and past it still takes a blob's first sharer when no other node is
known to provide the blob (registry/api.py, `UploadSlots`): every blob fetched from it has a
root to be referred to, and its first fetchers join its tree instead of all ending on the
holder's link as last resorts. A last resort is never refused, so never referred.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable

from mirror.routing.router import Provider

SHARER_PARAM = "sharer"
TRY_HEADER = "X-Mirror-Try"
HOPS_HEADER = "X-Mirror-Hops"
# Hops past this are not believed (a chain is at most as long as the cluster is large).
MAX_HOPS = 10_000
# A referral names at most this many sharers: enough to spread, small enough for one header.
MAX_REFERRED = 8
# "<40 hex digits>@<host>:<port>", the host a name, an IPv4 address or a bracketed IPv6 one.
_SHARER = re.compile(r"(?P<id>[0-9a-f]{40})@(?P<address>[A-Za-z0-9.\-\[\]:]{1,260}:[0-9]{1,5})")


def describe(provider: Provider) -> str:
    """`provider` as a sharer parameter or a referral names it."""
    return f"{provider.node_id.hex()}@{provider.address}"


def with_sharer(path: str, sharer: Provider) -> str:
    """`path` (with or without a query) asking as `sharer`, percent-encoded as it is sent."""
    value = urllib.parse.quote(describe(sharer), safe="@:")
    return f"{path}{'&' if '?' in path else '?'}{SHARER_PARAM}={value}"


def parse_sharer(text: str | None) -> Provider | None:
    """The sharer a (decoded) parameter names; None when absent or not well-formed."""
    if text is None:
        return None
    matched = _SHARER.fullmatch(text)
    if matched is None:
        return None
    return Provider(bytes.fromhex(matched["id"]), matched["address"])


def well_formed_sharer(text: str | None) -> str | None:
    """`text` when it names a sharer as `describe` does (the holder keeps the text), else None."""
    return text if text is not None and _SHARER.fullmatch(text) else None


def referral(sharers: Iterable[str]) -> str:
    """The `X-Mirror-Try` value naming `sharers` (`describe` texts, at most `MAX_REFERRED`)."""
    return ", ".join(list(sharers)[:MAX_REFERRED])


def parse_referral(text: str | None) -> list[Provider]:
    """The sharers an `X-Mirror-Try` header names, well-formed ones only, in order."""
    if not text:
        return []
    found = (parse_sharer(part.strip()) for part in text.split(",")[:MAX_REFERRED])
    return [p for p in found if p is not None]


def parse_hops(text: str | None) -> int | None:
    """The hops an `X-Mirror-Hops` header gives; None when absent or not a small number."""
    if text is None or not (text.isascii() and text.isdigit()) or len(text) > 5:
        return None
    hops = int(text)
    return hops if hops <= MAX_HOPS else None
