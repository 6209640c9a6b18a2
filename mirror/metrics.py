"""Prometheus metrics, kept in a registry object passed down rather than the global default."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler

# Sources a request can be answered from.
SOURCE_LOCAL = "local"
SOURCE_PEER = "peer"
SOURCE_UPSTREAM = "upstream"
# The runtime's own fetch in progress (containerd's ingest), served to peers as it grows.
SOURCE_RECEIVING = "receiving"
SOURCE_NONE = "none"

_LOOKUP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1)
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "mirror_requests",
            "Registry API requests answered, by method, kind, HTTP status and source (local, peer, "
            "upstream, receiving: the runtime's own fetch in progress, none).",
            ["method", "kind", "status", "source"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "mirror_request_duration_seconds",
            "Time to answer a registry request, body included.",
            ["kind", "source"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.bytes_served = Counter(
            "mirror_served_bytes",
            "Body bytes sent to registry clients, by kind and source.",
            ["kind", "source"],
            registry=self.registry,
        )
        self.alias_answers = Counter(
            "mirror_alias_answers",
            "Expected image names that could not be resolved, answered with their source's "
            "content (prefetch pins with a source).",
            ["expected", "source"],
            registry=self.registry,
        )
        self.prefetch_pins = Gauge(
            "mirror_prefetch_pins",
            "Images pinned on this node (prefetch file, workload watches, API), by state.",
            ["state"],
            registry=self.registry,
        )
        self.prefetch_bytes = Counter(
            "mirror_prefetch_bytes",
            "Blob bytes this node fetched to hold pinned images (not those it already held).",
            registry=self.registry,
        )
        self.distributions = Counter(
            "mirror_distributions",
            "Push events this node was first to see: a distribution started, or merged into "
            "one already under way (the same push again, a flood of events for one tag).",
            ["outcome"],
            registry=self.registry,
        )
        self.distribution_nodes = Counter(
            "mirror_distribution_nodes",
            "Nodes that ended their part in a distribution, by state (held, failed), as "
            "reported to this node (the origin) and by this node itself.",
            ["state"],
            registry=self.registry,
        )
        self.webhook_events = Counter(
            "mirror_webhook_events",
            "Push notifications received at /mirror/v1/events/, by source (distribution, "
            "dockerhub) and outcome (accepted: a tag push handed on; ignored: another action, "
            "a blob, a push by digest only; invalid: an event or a body that cannot be used; "
            "unauthorized: a request without the webhook token, counted once).",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.store_up = Gauge(
            "mirror_store_up",
            "1 when the node's store backend is connected.",
            ["store"],
            registry=self.registry,
        )

        self.dht_dropped = Counter(
            "mirror_dht_dropped_datagrams",
            "DHT datagrams dropped unprocessed, by reason (unauthenticated, stale, replayed, "
            "malformed).",
            ["reason"],
            registry=self.registry,
        )
        self.dht_contacts = Gauge(
            "mirror_dht_contacts",
            "Peers in this node's DHT routing table.",
            registry=self.registry,
        )
        self.dht_provider_records = Gauge(
            "mirror_dht_provider_records",
            "Provider records this node stores for the cluster (keys close to its id).",
            registry=self.registry,
        )
        self.peer_lookup_duration = Histogram(
            "mirror_peer_lookup_duration_seconds",
            "Time to find providers of a key in the DHT, by result (found, missing).",
            ["result"],
            buckets=_LOOKUP_BUCKETS,
            registry=self.registry,
        )
        self.advertised_keys = Gauge(
            "mirror_advertised_keys",
            "Keys this node announces as their provider, by kind (digest, tag).",
            ["kind"],
            registry=self.registry,
        )
        self.peer_fetch_failures = Counter(
            "mirror_peer_fetch_failures",
            "Fetches from a peer that failed and moved to another, by reason.",
            ["reason"],
            registry=self.registry,
        )
        # Spreading the load (peers/fetcher.py chooses, registry/api.py bounds).
        self.peer_uploads = Gauge(
            "mirror_peer_uploads",
            "Blob bodies this node is sending to peers now (last-resort ones included); "
            "bounded by --max-uploads.",
            registry=self.registry,
        )
        self.peer_uploads_refused = Counter(
            "mirror_peer_uploads_refused",
            "Peer blob requests answered 429 TOOMANYREQUESTS because --max-uploads bodies were "
            "being sent to peers, with no node fetching that blob from this one to name.",
            registry=self.registry,
        )
        self.peer_uploads_referred = Counter(
            "mirror_peer_uploads_referred",
            "Peer blob requests answered 429 with X-Mirror-Try, naming the nodes that fetch that "
            "blob from this node already and serve it while it arrives (at --blob-fanout of them, "
            "or past --max-uploads).",
            registry=self.registry,
        )
        self.peer_referrals_followed = Counter(
            "mirror_peer_referrals_followed",
            "Nodes this node asked for a blob because a busy provider referred it to them.",
            registry=self.registry,
        )
        self.peer_fetches_steered = Counter(
            "mirror_peer_fetches_steered",
            "Requests a busy provider refused (429); this node asked the next provider at once "
            "(or, when every one was busy, the least loaded as a last resort).",
            registry=self.registry,
        )
        self.peer_last_resort_fetches = Counter(
            "mirror_peer_last_resort_fetches",
            "Fetches (and redirects) for which every provider was busy, sent to the least "
            "loaded as a last-resort request it serves past its bound.",
            registry=self.registry,
        )
        self.peer_redirects = Counter(
            "mirror_peer_redirects",
            "Runtime blob requests with --peer-transfer=redirect, by result (sent: answered with "
            "a 307 to a signed URL at a peer that holds the blob or whose runtime is receiving it, "
            "which sends the bytes; "
            "no-holder: no provider serves it; retry: asked for again within 5 minutes of a "
            "redirect, so the transfer broke or the runtime refused the bytes). Past no-holder "
            "and retry the node serves the blob itself, as with --peer-transfer=share.",
            ["result"],
            registry=self.registry,
        )
        self.refused_requests = Counter(
            "mirror_refused_requests",
            "Registry requests refused before any store was asked, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "mirror_connections_closed",
            "Connections to the registry or metrics port the node closed, by reason (head-timeout: "
            "no whole request head within --request-head-timeout; per-client-limit: past "
            "--max-connections-per-client, closed at once).",
            ["reason"],
            registry=self.registry,
        )

        self.upstream_fetches = Counter(
            "mirror_upstream_fetches",
            "Requests sent to upstream registries, by kind (manifest, blob, tag) and result "
            "(ok, missing, error).",
            ["kind", "result"],
            registry=self.registry,
        )
        self.upstream_bytes = Counter(
            "mirror_upstream_bytes",
            "Body bytes received from upstream registries.",
            registry=self.registry,
        )
        self.token_fetches = Counter(
            "mirror_upstream_token_fetches",
            "Bearer tokens fetched from registries' token services, by result (ok, error).",
            ["result"],
            registry=self.registry,
        )
        self.coalesced_waits = Counter(
            "mirror_coalesced_waits",
            "Requests that joined a fetch already under way instead of starting one, by where "
            "(node: same node, cluster: another node's upstream fetch).",
            ["where"],
            registry=self.registry,
        )
        self.cache_bytes = Gauge(
            "mirror_cache_bytes",
            "Bytes of blobs in the node cache.",
            registry=self.registry,
        )
        self.cache_evictions = Counter(
            "mirror_cache_evictions",
            "Blobs evicted from the node cache (least recently used first) to stay under "
            "--cache-size or to make room on a full disk.",
            registry=self.registry,
        )
        self.cache_passthrough = Counter(
            "mirror_cache_passthrough",
            "Blobs the node cache could not keep, streamed through to their readers instead, "
            "by reason (over-bound: larger than --cache-size; no-space: the cache's disk is "
            "full even after evicting).",
            ["reason"],
            registry=self.registry,
        )
        self.cache_passthrough_bytes = Counter(
            "mirror_cache_passthrough_bytes",
            "Size of the blobs streamed through without being kept, by reason (as above).",
            ["reason"],
            registry=self.registry,
        )
        # Integrity of what the node holds (content/scrub.py): re-hashing by the background
        # scrub and on a peer's report, and what was found.
        self.verified_blobs = Counter(
            "mirror_verified_blobs",
            "Blobs this node re-hashed against their digest, by source (scrub, report).",
            ["source"],
            registry=self.registry,
        )
        self.verified_bytes = Counter(
            "mirror_verified_bytes",
            "Bytes this node read to re-hash blobs, by source (scrub, report).",
            ["source"],
            registry=self.registry,
        )
        self.corrupt_blobs = Counter(
            "mirror_corrupt_blobs",
            "Blobs found not to match their digest, by source (scrub, report) and action "
            "(evicted: from the node cache; kept: in the runtime's store, which mirror cannot "
            "change).",
            ["source", "action"],
            registry=self.registry,
        )
        self.corruption_reports_received = Counter(
            "mirror_corruption_reports_received",
            "Signed peer reports of a blob that did not match its digest, by outcome (queued, "
            "coalesced, recent, not-held, busy).",
            ["outcome"],
            registry=self.registry,
        )
        self.corruption_reports_sent = Counter(
            "mirror_corruption_reports_sent",
            "Reports sent to peers that served bytes not matching their digest, by result "
            "(accepted, refused, failed).",
            ["result"],
            registry=self.registry,
        )

    def observe(
        self,
        *,
        method: str,
        kind: str,
        status: int,
        source: str,
        seconds: float,
        body_bytes: int,
    ) -> None:
        self.requests.labels(method, kind, str(status), source).inc()
        self.request_duration.labels(kind, source).observe(seconds)
        if body_bytes:
            self.bytes_served.labels(kind, source).inc(body_bytes)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", make_aiohttp_handler(self.registry))
        return app
