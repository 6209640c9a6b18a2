"""The node agent: opens the store, joins the cluster, serves the registry API and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import shutil
import signal
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from mirror import __version__
from mirror.config import (
    Address,
    LogLevel,
    PeerTransfer,
    PrefetchConfig,
    RoutingConfig,
    RunConfig,
    StoreKind,
)
from mirror.content.advertiser import Advertiser
from mirror.content.scrub import BlobChecker, CorruptionReports, Scrubber
from mirror.content.service import ContentPolicy, ContentService
from mirror.errors import ConfigError, StoreUnavailable
from mirror.metrics import Metrics
from mirror.peers.auth import RequestSigner, RequestVerifier, UrlSigner, UrlVerifier
from mirror.peers.fetcher import PeerFetcher
from mirror.prefetch.distributor import Distributor, Reporter
from mirror.prefetch.model import Follow, Pin, Runtime
from mirror.prefetch.pinfile import PinFileWatcher
from mirror.prefetch.poll import Poller
from mirror.prefetch.prefetcher import PinnedSources, Prefetcher, Timing
from mirror.prefetch.resolve import host_platform
from mirror.prefetch.runtimes.containerd import ContainerdRuntime
from mirror.prefetch.runtimes.docker import DockerRuntime
from mirror.prefetch.watch import KubernetesWorkloads, NomadWorkloads, WorkloadWatch
from mirror.prefetch.watch.kubernetes import node_labels
from mirror.registry.access import AccessPolicy
from mirror.registry.api import RegistryApi
from mirror.registry.connections import ConnectionPolicy, GuardedServer
from mirror.registry.distributions_api import DISTRIBUTIONS_PATH, DistributionsApi
from mirror.registry.events_api import EventsApi
from mirror.registry.prefetch_api import PrefetchApi
from mirror.routing.bootstrap import Rebootstrapper
from mirror.routing.bootstrap.http import LookupFailed
from mirror.routing.dht import DhtNode
from mirror.routing.keys import stable_node_id
from mirror.routing.router import Provider
from mirror.status.api import StatusApi
from mirror.status.collector import NodeInfo, StatusCollector
from mirror.status.measure import Measurer
from mirror.status.pulls import PullLog
from mirror.stores.base import Store
from mirror.stores.cache import CacheStore
from mirror.stores.containerd.store import ContainerdStore
from mirror.stores.docker import inspect_docker
from mirror.stores.layered import LayeredStore
from mirror.upstream.client import UpstreamClient
from mirror.upstream.credentials import Credentials
from mirror.upstream.registries import UpstreamMap

log = logging.getLogger(__name__)


def cache_bytes(config: RunConfig) -> int:
    """--cache-size in bytes; a share is taken of the file system holding the cache."""
    if config.cache_size.bytes is not None:
        return config.cache_size.bytes
    assert config.cache_size.fraction is not None
    existing = config.cache_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return int(shutil.disk_usage(existing).total * config.cache_size.fraction)


async def _runtime_store(config: RunConfig) -> tuple[Store | None, StoreKind]:
    """The runtime's own store, started (None where the runtime keeps no usable content), and
    which runtime the node found: containerd, docker, or none (`CACHE`)."""
    if config.store is StoreKind.CACHE:
        return None, StoreKind.CACHE
    if config.store is StoreKind.CONTAINERD:
        return await _started(ContainerdStore(config.containerd)), StoreKind.CONTAINERD
    if config.store is StoreKind.DOCKER:
        return await _docker_store(config), StoreKind.DOCKER
    try:
        return await _started(ContainerdStore(config.containerd)), StoreKind.CONTAINERD
    except StoreUnavailable as exc:
        log.info("store auto: %s", exc)
    try:
        return await _docker_store(config), StoreKind.DOCKER
    except StoreUnavailable as exc:
        log.info("store auto: %s; using the node cache only", exc)
    return None, StoreKind.CACHE


async def _docker_store(config: RunConfig) -> Store | None:
    engine = await inspect_docker(config.docker_host)
    if not engine.containerd_image_store:
        log.info(
            "Docker %s keeps images in its classic store, which holds no manifests or "
            "compressed layers: serving what passes through the node cache",
            engine.version,
        )
        return None
    containerd = replace(config.containerd, namespace=engine.containerd_namespace)
    log.info(
        "Docker %s uses containerd's image store: namespace %s",
        engine.version,
        containerd.namespace,
    )
    return await _started(ContainerdStore(containerd))


async def _started(store: Store) -> Store:
    try:
        await store.start()
    except StoreUnavailable:
        await store.close()
        raise
    return store


@dataclass(frozen=True, slots=True)
class Stores:
    """What the node serves (the runtime's store, then the cache), the cache itself, and
    which runtime was found (`CACHE`: none)."""

    served: Store
    cache: CacheStore
    runtime: StoreKind


async def open_stores(config: RunConfig, metrics: Metrics) -> Stores:
    runtime, kind = await _runtime_store(config)
    cache = CacheStore(config.cache_dir, max_bytes=cache_bytes(config), metrics=metrics)
    try:
        await cache.start()
    except StoreUnavailable:
        if runtime is not None:
            await runtime.close()
        raise
    if runtime is None:
        return Stores(cache, cache, kind)
    return Stores(LayeredStore(runtime, cache), cache, kind)


class _MalformedRequests(logging.Filter):
    """One INFO line, not an ERROR with a traceback, for a request aiohttp cannot parse.

    The client already got its 400; a traceback per garbage request would let anyone who can
    reach the port fill the node's log, and hide the errors that matter.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BadHttpMessage):
            record.levelno, record.levelname = logging.INFO, "INFO"
            detail = " ".join(str(exc.message).split())  # aiohttp's spans lines
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = f"malformed request from {remote}, answered 400: {detail}"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


_HTTP_LOG = logging.getLogger("mirror.http")
_HTTP_LOG.addFilter(_MalformedRequests())

_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&\s\"]*")


class _RedactTokens(logging.Filter):
    """The debug access log must not keep a webhook's token (Docker Hub's is in the query)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = _TOKEN_IN_QUERY.sub(r"\1REDACTED", record.msg)
        return True


logging.getLogger("mirror.access").addFilter(_RedactTokens())


async def _serve(
    app: web.Application,
    address: Address,
    *,
    access_log: bool,
    connections: ConnectionPolicy,
) -> GuardedServer:
    """Serve `app` on `address`, its connections bounded (registry/connections.py)."""
    access_logger = logging.getLogger("mirror.access") if access_log else None
    server = GuardedServer(app, connections, access_log=access_logger, logger=_HTTP_LOG)
    try:
        await server.start(address.host, address.port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    return server


def advertise_ip(routing: RoutingConfig, registry_addr: Address) -> str:
    """The IP peers dial: explicit, else the registry's own, else the outward interface's."""
    if routing.advertise_ip is not None:
        return routing.advertise_ip
    try:
        host = ipaddress.ip_address(registry_addr.host)
    except ValueError:
        try:
            host = ipaddress.ip_address(socket.gethostbyname(registry_addr.host))
        except OSError as exc:
            raise ConfigError(f"cannot resolve {registry_addr.host}; set --advertise-addr") from exc
    if not host.is_unspecified:
        return str(host)
    # Connecting a UDP socket sends nothing; it only asks the kernel which source address
    # its routing table would use to leave this host.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            return str(probe.getsockname()[0])
        except OSError as exc:
            raise ConfigError(
                "cannot tell which address peers should dial; set --advertise-addr"
            ) from exc


class _Background:
    """Long-running tasks of the node; a task that dies unexpectedly is logged, not lost."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(self._report)
        self._tasks.append(task)

    @staticmethod
    def _report(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "%s stopped: %s", task.get_name(), task.exception(), exc_info=task.exception()
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _join_cluster(
    config: RunConfig,
    store: Store,
    transfer: PeerTransfer,
    metrics: Metrics,
    stack: AsyncExitStack,
    background: _Background,
) -> tuple[AccessPolicy, PeerFetcher | None, DhtNode | None]:
    routing = config.routing
    key = routing.cluster_key
    if key is None:
        log.info("no cluster key: running alone (no DHT, no peers)")
        return AccessPolicy(routing.allow_clients, None), None, None
    ip = advertise_ip(routing, config.registry_addr)
    http_address = str(Address(ip, config.registry_addr.port))
    dht = DhtNode(
        node_id=stable_node_id(http_address),
        http_address=http_address,
        cluster_key=key,
        resolve_timeout=routing.resolve_timeout,
        record_ttl=routing.advertise_ttl,
        metrics=metrics,
    )
    await dht.listen(routing.router_addr.host, routing.router_addr.port)
    stack.push_async_callback(dht.close)
    own_router = (ip, dht.router_address[1])
    rebootstrapper = Rebootstrapper(
        routing.bootstrap, dht.bootstrap, dht.contact_count, own_address=own_router
    )
    background.start("bootstrap", rebootstrapper.run())
    advertiser = Advertiser(store, dht, metrics, ttl=routing.advertise_ttl)
    background.start("advertiser", advertiser.run())
    # Only a node in redirect mode signs URLs; every node serves those its peers signed for it.
    redirecting = transfer is PeerTransfer.REDIRECT
    url_signer = UrlSigner(key) if redirecting else None
    fetcher = PeerFetcher(
        dht,
        RequestSigner(key),
        metrics,
        url_signer=url_signer,
        ranges=routing.peer_ranges,
        range_size=routing.peer_range_size,
        own=Provider(dht.node_id, http_address),
    )
    await fetcher.start()
    stack.push_async_callback(fetcher.close)
    log.info(
        "joined the cluster as %s (router %s, peer transfer %s)",
        http_address,
        routing.router_addr,
        transfer,
    )
    access = AccessPolicy(
        routing.allow_clients, RequestVerifier(key), url_verifier=UrlVerifier(key, http_address)
    )
    return access, fetcher, dht


def _integrity(
    config: RunConfig,
    store: Store,
    cache: CacheStore,
    metrics: Metrics,
    stack: AsyncExitStack,
    background: _Background,
) -> CorruptionReports:
    """Re-hashing what the node serves: on peers' reports, and in the background scrub."""
    runtime = store.runtime if isinstance(store, LayeredStore) else None
    checker = BlobChecker(cache, metrics, runtime=runtime)
    reports = CorruptionReports(checker, metrics)
    stack.push_async_callback(reports.close)
    if config.scrub_rate > 0:
        background.start("scrub", Scrubber(checker, cache, rate=config.scrub_rate).run())
    else:
        log.info("scrub off: cached blobs are only re-hashed on peers' reports")
    return reports


async def _upstream_client(
    config: RunConfig, metrics: Metrics, stack: AsyncExitStack
) -> UpstreamClient | None:
    settings = config.upstream
    if not settings.fallback:
        log.info("upstream fallback off: a miss in the cluster is a 404")
        return None
    credentials = Credentials.load(settings.auth_file) if settings.auth_file else None
    client = UpstreamClient(
        UpstreamMap(dict(settings.overrides)),
        credentials,
        metrics,
        response_timeout=settings.timeout,
    )
    await client.start()
    stack.push_async_callback(client.close)
    return client


def _node_info(config: RunConfig, store: str, dht: DhtNode | None, runtime: str | None) -> NodeInfo:
    """What the status report says this node is."""
    return NodeInfo(
        node_id=dht.node_id if dht is not None else None,
        address=dht.http_address if dht is not None else str(config.registry_addr),
        registry_addr=str(config.registry_addr),
        metrics_addr=str(config.metrics_addr),
        router_addr=str(config.routing.router_addr) if dht is not None else None,
        store=store,
        version=__version__,
        platform=host_platform(),
        runtime=runtime,
    )


def _pull_via(address: Address) -> str:
    """Where dockerd reaches this node's registry port: loopback when it listens on all
    interfaces (dockerd takes 127.0.0.0/8 registries over plain HTTP)."""
    try:
        unspecified = ipaddress.ip_address(address.host).is_unspecified
    except ValueError:
        unspecified = False
    return str(Address("127.0.0.1", address.port)) if unspecified else str(address)


async def _prefetch(
    config: RunConfig,
    kind: StoreKind,
    content: ContentService,
    sources: PinnedSources,
    metrics: Metrics,
    stack: AsyncExitStack,
) -> Prefetcher:
    """The prefetcher, with the runtime it puts images into (none: held in the node cache)."""
    runtime: Runtime | None = None
    if kind is StoreKind.CONTAINERD:
        containerd = ContainerdRuntime(config.containerd.socket, config.containerd.namespace)
        await containerd.start()
        stack.push_async_callback(containerd.close)
        runtime = containerd
    elif kind is StoreKind.DOCKER:
        runtime = DockerRuntime(config.docker_host, pull_via=_pull_via(config.registry_addr))
    prefetcher = Prefetcher(
        content,
        runtime,
        metrics,
        labels=dict(config.prefetch.node_labels),
        platform=host_platform(),
        sources=sources,
        timing=Timing(recheck=config.prefetch.recheck),
    )
    stack.push_async_callback(prefetcher.close)
    return prefetcher


def _follow_pins(
    config: RunConfig,
    prefetcher: Prefetcher,
    distributor: Distributor,
    upstream: UpstreamClient | None,
    dht: DhtNode | None,
    background: _Background,
) -> None:
    """Feed the prefetcher: the prefetch file (pins, and follows for the distributor and the
    poller), the workload watches, and the distributions this node missed while down."""
    settings = config.prefetch
    poller = None
    if upstream is not None:
        poller = Poller((), upstream, distributor, may_poll=_poll_claim(dht))
        background.start("poll", poller.run())

    # Catching up waits for the file's first reading: a distribution is taken or not by the
    # follows it names.
    follows_known = asyncio.Event()

    def on_follows(follows: tuple[Follow, ...]) -> None:
        distributor.set_follows(follows)
        if poller is not None:
            poller.set_follows(follows)
        follows_known.set()

    if settings.file is None:
        follows_known.set()
    else:
        watcher = PinFileWatcher(settings.file, settings.file_poll)
        background.start(
            "prefetch file", _follow_file(watcher, prefetcher, settings.file_poll, on_follows)
        )
    if settings.nomad is not None:
        assert settings.nomad_datacenter is not None, "checked when the flags were read"
        nomad = NomadWorkloads(
            settings.nomad,
            datacenter=settings.nomad_datacenter,
            node_pool=settings.nomad_node_pool,
        )
        background.start("prefetch nomad", _follow_workloads("nomad", nomad, prefetcher))
    if settings.kubernetes is not None:
        background.start("prefetch kubernetes", _follow_kubernetes(settings, prefetcher))
    if dht is not None:
        background.start("distribution catch-up", _catch_up(dht, distributor, follows_known))


# A poll claim lives this long unless renewed (the poller renews it at every poll).
_POLL_CLAIM_TTL = 120.0


def _poll_claim(dht: DhtNode | None) -> Callable[[str], Awaitable[bool]]:
    """One node of the cluster polls each followed pattern: the one holding its DHT claim."""

    async def may_poll(match: str) -> bool:
        if dht is None:
            return True
        return await dht.claim(f"poll:{match}", _POLL_CLAIM_TTL) is None

    return may_poll


def _others_known_to(dht: DhtNode | None) -> Callable[[str], list[str]]:
    """The ids (hex) of the other nodes `dht`'s own records say provide a key (none without a
    DHT)."""
    if dht is None:
        return lambda key: []
    return lambda key: [
        p.node_id.hex() for p in dht.local_providers(key) if p.node_id != dht.node_id
    ]


def _reporter(fetcher: PeerFetcher, own: str) -> Reporter:
    """A distribution's progress to its origin, as a signed peer request."""

    async def report(origin: str, distribution_id: str, body: dict[str, object]) -> None:
        path = f"{DISTRIBUTIONS_PATH}/{distribution_id}/report?node={urllib.parse.quote(own)}"
        status = await fetcher.post_signed(origin, path, body)
        if status >= 300:
            log.info("distribution %s: %s refused the report (%d)", distribution_id, origin, status)

    return report


async def _catch_up(dht: DhtNode, distributor: Distributor, follows_known: asyncio.Event) -> None:
    """Once the node knows what it follows and a peer, the distributions announced while it
    was down."""
    await follows_known.wait()
    await dht.wait_for_contact()
    await distributor.catch_up()


async def _follow_file(
    watcher: PinFileWatcher,
    prefetcher: Prefetcher,
    interval: float,
    on_follows: Callable[[tuple[Follow, ...]], None],
) -> None:
    """Poll the file (a ConfigMap's symlink swap has no event to wait for); its pins go to the
    prefetcher, its follows to `on_follows`, both each time the file says something new."""
    prefetcher.set_pins("file", ())
    first = True
    while True:
        found = await watcher.check()
        if found is not None:
            prefetcher.set_pins("file", found.pins)
            on_follows(found.follows)
        elif first:
            on_follows(())  # a file broken from the start follows nothing, for now
        first = False
        prefetcher.report("file", watcher.last_error)
        await asyncio.sleep(interval)


async def _follow_workloads(origin: str, watch: WorkloadWatch, prefetcher: Prefetcher) -> None:
    """Each set of images the watch yields replaces the origin's pins."""
    images = watch.images()
    try:
        async for refs in images:
            prefetcher.set_pins(origin, [Pin(ref, origin=origin) for ref in sorted(refs, key=str)])
    finally:
        aclose = getattr(images, "aclose", None)
        if aclose is not None:
            await aclose()


async def _follow_kubernetes(settings: PrefetchConfig, prefetcher: Prefetcher) -> None:
    """The Kubernetes watch, matched on the node's own labels (read once from the API)."""
    assert settings.kubernetes is not None
    labels = dict(settings.node_labels)
    if settings.node_name is not None:
        try:
            found = await node_labels(settings.kubernetes, settings.node_name)
        except LookupFailed as exc:
            log.warning("cannot read the labels of node %s: %s", settings.node_name, exc)
            prefetcher.report("kubernetes", f"node labels: {exc}")
        else:
            labels = {**found, **labels}
            prefetcher.add_labels(found)
    watch = KubernetesWorkloads(
        settings.kubernetes, labels, namespace=settings.kubernetes_namespace
    )
    await _follow_workloads("kubernetes", watch, prefetcher)


async def run_node(config: RunConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if config.log_level is not LogLevel.DEBUG:
        # kademlia logs every RPC at INFO.
        logging.getLogger("kademlia").setLevel(logging.WARNING)
        logging.getLogger("rpcudp").setLevel(logging.WARNING)
    metrics = Metrics()
    background = _Background()
    async with AsyncExitStack() as stack:
        stores = await open_stores(config, metrics)
        store, cache = stores.served, stores.cache
        stack.push_async_callback(store.close)
        metrics.store_up.labels(store.name).set(1)
        upstream = await _upstream_client(config, metrics, stack)
        # `auto` settled once, by what the store shows (config.PeerTransfer.for_store).
        transfer = config.routing.peer_transfer.for_store(store.shows_receiving)
        try:
            access, peers, dht = await _join_cluster(
                config, store, transfer, metrics, stack, background
            )
        finally:
            # Unwound before the DHT closes: nothing announces into a closed node.
            stack.push_async_callback(background.stop)
        policy = ContentPolicy(
            mirrored_registries=config.mirrored_registries,
            resolve_tags=config.resolve_tags,
            tag_timeout=config.upstream.tag_timeout,
            peer_transfer=transfer,
        )
        sources = PinnedSources()
        content = ContentService(
            store,
            metrics,
            policy,
            cache=cache,
            peers=peers,
            router=dht,
            upstream=upstream,
            aliases=sources,
        )
        stack.push_async_callback(content.close)
        reports = _integrity(config, store, cache, metrics, stack, background)
        prefetch = await _prefetch(config, stores.runtime, content, sources, metrics, stack)
        distributor = Distributor(
            prefetch,
            metrics,
            own_address=dht.http_address if dht is not None else str(config.registry_addr),
            broadcaster=dht,
            reporter=_reporter(peers, dht.http_address) if peers and dht else None,
        )
        stack.push_async_callback(distributor.close)
        pulls = PullLog(peers=peers)
        status = StatusCollector(
            _node_info(config, store.name, dht, prefetch.runtime_name),
            store=store,
            metrics=metrics,
            pulls=pulls,
            cache=cache,
            contacts=dht,
            peers=peers,
            upstream=upstream,
            pins=prefetch,
            distributions=distributor,
        )
        measurer = Measurer(content, host_platform())
        api = RegistryApi(
            metrics,
            content,
            access=access,
            reports=reports,
            max_uploads=config.routing.max_uploads,
            blob_fanout=config.routing.blob_fanout,
            known_providers=_others_known_to(dht),
            extensions=[
                PrefetchApi(prefetch, host_platform(), access),
                DistributionsApi(distributor, access),
                EventsApi(distributor, config.prefetch.webhook_token, metrics),
                StatusApi(status, access, measurer),
            ],
            pulls=pulls,
        )
        debug = config.log_level is LogLevel.DEBUG
        connections = ConnectionPolicy(config.http_limits, metrics)
        stack.callback(connections.close)
        registry_server = await _serve(
            api.app(), config.registry_addr, access_log=debug, connections=connections
        )
        stack.push_async_callback(registry_server.close)
        metrics_app = metrics.app()
        StatusApi(status, access, measurer, page=True).add_routes(metrics_app)
        metrics_server = await _serve(
            metrics_app, config.metrics_addr, access_log=False, connections=connections
        )
        stack.push_async_callback(metrics_server.close)
        log.info(
            "serving the registry API on %s (store %s), metrics on %s",
            config.registry_addr,
            store.name,
            config.metrics_addr,
        )
        # Started once the registry port answers: the Docker runtime pulls through it.
        _follow_pins(config, prefetch, distributor, upstream, dht, background)
        await stop.wait()
        log.info("stopping")
