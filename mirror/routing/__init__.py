"""Routing: who in the cluster holds a digest or a tag, and who fetches it from upstream.

`router.py` is the seam the rest of the node depends on (`Router`, `Provider`); importing it
loads nothing else. Behind it, `dht.py` (`DhtNode`) is the cluster DHT of provider records
built from the modules here, one job each: `rpc.py` (the authenticated UDP endpoint),
`handlers.py` (what a node answers), `client.py` (what it asks), `table.py` (routing-table
upkeep around kademlia's `RoutingTable`), `lookup.py` (iterative lookups under a deadline),
`crawl.py` (bootstrap and maintenance walks), `providers.py` (records and claims a node
keeps), `claims.py` (claiming an upstream fetch), `broadcast.py` (cluster-wide messages,
flooded over the routing table) with `messages.py` (their limits and the recent ones a node
keeps), `wire.py`, `auth.py`, `keys.py`, `settings.py` and `errors.py`. `memory.py` is an
in-process `Router` and `Broadcaster` for tests;
`bootstrap/` finds the first contacts (static lists, DNS, orchestrators).

This package imports nothing on purpose: name the module you need.
"""
