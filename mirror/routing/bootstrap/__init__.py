"""Where a node finds its first DHT peers, and the loop that keeps it connected.

``--bootstrap KIND:VALUE`` names a source of peer addresses (see ``base``). The kinds are one
literal table below, read by ``parse_bootstrap``: adding a kind means adding a module and a
line here, and nothing registers itself at import time, so which kinds exist does not depend
on which modules happen to have been imported.

The sources never look at the process's variables: mirror.cli reads what Kubernetes and
Nomad put there once, into an ``OrchestratorEnv``, and passes it to ``parse_bootstrap``.

- ``base``: the ``BootstrapSource`` interface, the parsed ``BootstrapSpec``, address helpers
- ``static``, ``dns``: fixed lists and DNS names
- ``kubernetes``, ``nomad``: the orchestrators' HTTP APIs, over the shared ``http`` helper
- ``rebootstrap``: asking all sources at once, and the loop that keeps a node connected
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from mirror.errors import ConfigError
from mirror.routing.bootstrap.base import BootstrapSource, BootstrapSpec, Peer, SourceFactory
from mirror.routing.bootstrap.dns import DnsBootstrap, dns_factory
from mirror.routing.bootstrap.env import OrchestratorEnv
from mirror.routing.bootstrap.kubernetes import KubernetesBootstrap, kubernetes_factory
from mirror.routing.bootstrap.nomad import NomadBootstrap, NomadSettings, nomad_factory
from mirror.routing.bootstrap.rebootstrap import Rebootstrapper, gather_addresses
from mirror.routing.bootstrap.static import StaticBootstrap, static_factory

__all__ = [
    "BootstrapSource",
    "BootstrapSpec",
    "DnsBootstrap",
    "KubernetesBootstrap",
    "NomadBootstrap",
    "NomadSettings",
    "Peer",
    "Rebootstrapper",
    "StaticBootstrap",
    "bootstrap_kinds",
    "gather_addresses",
    "parse_bootstrap",
]

KINDS: Final[Mapping[str, SourceFactory]] = MappingProxyType(
    {
        "static": static_factory,
        "dns": dns_factory,
        "kubernetes": kubernetes_factory,
        "nomad": nomad_factory,
    }
)


def bootstrap_kinds() -> list[str]:
    """The known kinds, sorted (for help and error texts)."""
    return sorted(KINDS)


def parse_bootstrap(
    text: str,
    default_port: int,
    *,
    dns_server: Peer | None = None,
    env: OrchestratorEnv | None = None,
) -> BootstrapSource:
    """Build the source one ``--bootstrap KIND:VALUE`` names; ConfigError if it is unusable.

    ``default_port`` is the router port, for entries without one; ``dns_server`` is
    ``--dns-server`` for ``dns:``; ``env`` is what the orchestrator told this node, for
    ``kubernetes:`` and ``nomad:`` (None: it told nothing, as outside any orchestrator).
    """
    kind, separator, value = text.partition(":")
    factory = KINDS.get(kind) if separator else None
    if factory is None:
        raise ConfigError(
            f"--bootstrap {text!r}: expected KIND:VALUE with KIND one of "
            f"{', '.join(bootstrap_kinds())} (e.g. static:10.0.0.5:{default_port})"
        )
    spec = BootstrapSpec(text, kind, value, default_port, dns_server, env or OrchestratorEnv())
    return factory(spec)
