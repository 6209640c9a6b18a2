"""Routing: the cluster DHT that says which peers hold a digest or a tag.

Provider records (many per key, each naming a peer's HTTP address) on top of kademlia, with
authenticated datagrams, single-datagram replies and hard lookup deadlines.
"""

from mirror.routing.dht import DhtNode, Provider, dht_key, stable_node_id
from mirror.routing.errors import (
    DatagramRejected,
    DhtError,
    DhtNotRunning,
    Malformed,
    Replayed,
    Stale,
    Unauthenticated,
    UnsupportedOperation,
)

__all__ = [
    "DatagramRejected",
    "DhtError",
    "DhtNode",
    "DhtNotRunning",
    "Malformed",
    "Provider",
    "Replayed",
    "Stale",
    "Unauthenticated",
    "UnsupportedOperation",
    "dht_key",
    "stable_node_id",
]
