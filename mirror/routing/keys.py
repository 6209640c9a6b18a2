"""Identifiers in the DHT's 160-bit space: content keys and node ids.

Both are truncated SHA-256 under distinct prefixes, so a node id can never be chosen to equal a
key by hashing the same text, and the 20-byte width matches kademlia's routing table.
"""

from __future__ import annotations

import hashlib

ID_BYTES = 20

_KEY_PREFIX = b"mirror/dht-key\x00"
_NODE_PREFIX = b"mirror/dht-node\x00"


def dht_key(text: str) -> bytes:
    """The 20-byte key under which providers of `text` (a digest or a tag reference) are kept."""
    return hashlib.sha256(_KEY_PREFIX + text.encode()).digest()[:ID_BYTES]


def stable_node_id(http_address: str) -> bytes:
    """A node id derived from the address the node advertises, hence the same after a restart.

    A restarted node that kept its id keeps its place in its peers' routing tables and stays
    responsible for the same keys, instead of appearing as a stranger whose records are lost.
    """
    return hashlib.sha256(_NODE_PREFIX + http_address.encode()).digest()[:ID_BYTES]


def distance(a: bytes, b: bytes) -> int:
    """Kademlia's XOR metric between two ids."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
