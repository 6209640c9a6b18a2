"""The node agent: opens the store, serves the registry API and metrics until told to stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import AsyncExitStack

from aiohttp import web

from mirror.config import Address, LogLevel, RunConfig, StoreKind
from mirror.errors import ConfigError, StoreUnavailable
from mirror.metrics import Metrics
from mirror.registry.api import RegistryApi
from mirror.stores.base import Store
from mirror.stores.cache import CacheStore
from mirror.stores.containerd.store import ContainerdStore

log = logging.getLogger(__name__)


async def open_store(config: RunConfig) -> Store:
    """The configured store, started; `auto` takes containerd only when its socket answers."""
    if config.store is StoreKind.CACHE:
        store: Store = CacheStore(config.cache_dir)
    elif config.store is StoreKind.CONTAINERD:
        store = ContainerdStore(config.containerd)
    else:
        candidate = ContainerdStore(config.containerd)
        try:
            await candidate.start()
        except StoreUnavailable as exc:
            log.info("store auto: %s; using the node cache at %s", exc, config.cache_dir)
            await candidate.close()
            store = CacheStore(config.cache_dir)
        else:
            log.info("store auto: containerd at %s", config.containerd.socket)
            return candidate
    try:
        await store.start()
    except StoreUnavailable:
        await store.close()
        raise
    return store


async def _serve(app: web.Application, address: Address, *, access_log: bool) -> web.AppRunner:
    runner = web.AppRunner(
        app, access_log=logging.getLogger("mirror.access") if access_log else None
    )
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    return runner


async def run_node(config: RunConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    metrics = Metrics()
    async with AsyncExitStack() as stack:
        store = await open_store(config)
        stack.push_async_callback(store.close)
        metrics.store_up.labels(store.name).set(1)
        api = RegistryApi(store, metrics)
        debug = config.log_level is LogLevel.DEBUG
        registry_runner = await _serve(api.app(), config.registry_addr, access_log=debug)
        stack.push_async_callback(registry_runner.cleanup)
        metrics_runner = await _serve(metrics.app(), config.metrics_addr, access_log=False)
        stack.push_async_callback(metrics_runner.cleanup)
        log.info(
            "serving the registry API on %s (store %s), metrics on %s",
            config.registry_addr,
            store.name,
            config.metrics_addr,
        )
        await stop.wait()
        log.info("stopping")
