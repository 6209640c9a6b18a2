"""Find out what a node's Docker Engine can serve, and through which backend.

Docker keeps images in one of two stores, and only one of them holds registry bytes:

- The classic store (graph drivers such as overlay2 or vfs; the only one before Docker 24)
  keeps neither manifests nor compressed layers. A pull leaves extracted layer directories,
  the image config (``imagedb/content/sha256/<id>``, byte-exact) and, per layer, the
  compressed digest and source repository it came from (``v2metadata-by-diffid``), but not
  the compressed bytes. ``docker save`` writes freshly re-gzipped tars whose digests never
  match the registry's, and the manifest is not kept at all, so no exact blob can be rebuilt.
  On such a node mirror can only serve what passed through its own cache on the way to
  dockerd (dockerd pulling through the node's mirror via ``registry-mirrors``).
- The containerd image store (the ``containerd-snapshotter`` feature: opt-in from Docker 24,
  default on fresh installs from 29) keeps images in containerd, namespace ``moby``, with
  every manifest and compressed blob intact. That is served through the containerd backend
  pointed at Docker's containerd and that namespace; nothing Docker-specific is needed.

So the only question for Docker is which of the two a daemon uses, answered here from
``docker info``. The Docker SDK is synchronous: it runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import requests.exceptions

from mirror.config import DEFAULT_DOCKER_HOST
from mirror.errors import StoreUnavailable

# `docker info` DriverStatus entry a daemon on the containerd image store reports.
_DRIVER_TYPE_KEY = "driver-type"
_SNAPSHOTTER_DRIVER_TYPE = "io.containerd.snapshotter.v1"
DEFAULT_CONTAINERD_NAMESPACE = "moby"
DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class DockerEngine:
    """What ``docker info`` says about a daemon's image store.

    ``containerd_image_store`` is true when images live in containerd (namespace
    ``containerd_namespace``) and can therefore be served byte-exact by the containerd
    backend. ``containerd_address`` is the containerd socket the daemon uses, when the daemon
    reports it (``Containerd.Address``, Docker 27+); ``None`` otherwise.
    """

    version: str
    containerd_image_store: bool
    containerd_namespace: str = DEFAULT_CONTAINERD_NAMESPACE
    containerd_address: str | None = None


async def inspect_docker(
    docker_host: str = DEFAULT_DOCKER_HOST, *, timeout: float = DEFAULT_TIMEOUT
) -> DockerEngine:
    """Ask the daemon at ``docker_host`` which image store it uses.

    ``docker_host`` is a Docker host URL such as ``unix:///var/run/docker.sock``, as
    mirror.cli resolved it (``--docker-host``, ``MIRROR_DOCKER_HOST``, ``DOCKER_HOST``, else
    the default socket); nothing here looks at the process's variables.

    Raises ``StoreUnavailable`` with a one-line message when the daemon does not answer
    within ``timeout`` seconds: a node without a working Docker must fail at startup with a
    clear reason rather than later on the first pull.
    """
    try:
        info = await asyncio.wait_for(
            asyncio.to_thread(_docker_info, docker_host, timeout), timeout
        )
    except TimeoutError:
        raise StoreUnavailable(
            f"Docker daemon at {docker_host}: no answer within {timeout:g}s"
        ) from None
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise StoreUnavailable(f"Docker daemon at {docker_host}: {_one_line(exc)}") from exc
    return engine_from_info(info)


def engine_from_info(info: Mapping[str, Any]) -> DockerEngine:
    """Read a ``docker info`` answer (``GET /info``).

    The containerd image store shows as ``["driver-type", "io.containerd.snapshotter.v1"]``
    in ``DriverStatus``; the classic store's drivers list other pairs there, or none at all
    (``vfs`` gives ``null``).
    """
    status = info.get("DriverStatus") or []
    containerd_store = any(
        isinstance(pair, list | tuple)
        and len(pair) == 2
        and pair[0] == _DRIVER_TYPE_KEY
        and pair[1] == _SNAPSHOTTER_DRIVER_TYPE
        for pair in status
    )
    containerd = info.get("Containerd") or {}
    namespaces = containerd.get("Namespaces") or {}
    return DockerEngine(
        version=str(info.get("ServerVersion") or ""),
        containerd_image_store=containerd_store,
        containerd_namespace=str(namespaces.get("Containers") or DEFAULT_CONTAINERD_NAMESPACE),
        containerd_address=containerd.get("Address") or None,
    )


def _docker_info(docker_host: str, timeout: float) -> dict[str, Any]:
    """``GET /info`` with a fresh client (blocking; runs in a worker thread)."""
    # version="auto" negotiates the API version: a pinned old one is refused by new daemons
    # (Docker 29 accepts 1.44 and later only). Not docker.from_env(): the host is given.
    client = docker.DockerClient(base_url=docker_host, version="auto", timeout=timeout)
    try:
        info: dict[str, Any] = client.info()
        return info
    finally:
        client.close()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
