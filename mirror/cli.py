"""The `mirror` command line. Every flag of `mirror run` may also come from `MIRROR_<FLAG>`.

This is the one module that reads the process's variables: `MIRROR_<FLAG>` for every flag,
and the few that other programs define and mirror honours (`DOCKER_HOST`, and what
Kubernetes and Nomad put into a workload, see `OTHER_VARIABLES`). They go into the typed
configuration of mirror.config, built once here and passed down.

Errors end the program with one line on stderr and a non-zero status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from mirror import __version__
from mirror.config import (
    DEFAULT_BLOB_FANOUT,
    DEFAULT_DOCKER_HOST,
    DEFAULT_MAX_UPLOADS,
    DEFAULT_PEER_RANGES,
    ContainerdConfig,
    HttpLimits,
    LogLevel,
    PeerTransfer,
    PrefetchConfig,
    RoutingConfig,
    RunConfig,
    StoreKind,
    UpstreamConfig,
    WorkloadSource,
    parse_address,
    parse_bool,
    parse_cache_size,
    parse_cidr,
    parse_connection_cap,
    parse_duration,
    parse_ip,
    parse_mib_per_second,
    parse_node_name,
    parse_peer_range_size,
    parse_peer_ranges,
    parse_upload_cap,
)
from mirror.errors import ConfigError, MirrorError
from mirror.oci.reference import validate_registry
from mirror.routing.bootstrap.env import (
    SERVICE_ACCOUNT_DIR,
    KubernetesEnv,
    NomadEnv,
    OrchestratorEnv,
)
from mirror.upstream.registries import parse_upstream

PROG = "mirror"


# Variables other programs define that mirror honours besides MIRROR_<FLAG>, with what they
# mean to it (docs/configuration.md lists them). Read in this module only.
OTHER_VARIABLES: Mapping[str, str] = MappingProxyType(
    {
        "DOCKER_HOST": "Docker's API socket when neither --docker-host nor MIRROR_DOCKER_HOST is "
        "set, as the docker CLI reads it",
        "KUBERNETES_SERVICE_HOST": "the API server's address, for --bootstrap kubernetes: "
        "(Kubernetes sets it in every pod; the token and CA are read from "
        f"{SERVICE_ACCOUNT_DIR})",
        "KUBERNETES_SERVICE_PORT": "the API server's port, for --bootstrap kubernetes:",
        "NOMAD_ADDR": "the Nomad HTTP API for --bootstrap nomad: http://HOST:PORT, https://… or "
        "unix://… (the Task API socket; default http://127.0.0.1:4646)",
        "NOMAD_TOKEN": "the ACL token or workload identity sent to Nomad (needed for unix://)",
        "NOMAD_NAMESPACE": "the namespace of the Nomad service (default: default)",
        "NOMAD_REGION": "the region asked (default: the agent's own)",
        "NOMAD_CACERT": "CA certificate file verifying an https:// NOMAD_ADDR",
        "NOMAD_CAPATH": "directory of CA certificates, when NOMAD_CACERT is not set",
        "NOMAD_CLIENT_CERT": "client certificate for mutual TLS, with NOMAD_CLIENT_KEY",
        "NOMAD_CLIENT_KEY": "the key of NOMAD_CLIENT_CERT",
        "NOMAD_SKIP_VERIFY": "true: do not verify Nomad's TLS certificate",
        "NOMAD_TLS_SERVER_NAME": "the server name expected in Nomad's certificate",
        "NOMAD_DC": "the node's datacenter when --nomad-datacenter is not set (Nomad sets it "
        "in every task), for --prefetch-from nomad",
    }
)


def orchestrator_env(environ: Mapping[str, str]) -> OrchestratorEnv:
    """What Kubernetes and Nomad told this process, as given; an empty value counts as unset.

    Nothing is checked here: a ``kubernetes:`` or ``nomad:`` bootstrap spec checks what it
    uses, so a node that uses neither never fails on these variables.
    """

    def get(name: str) -> str | None:
        return environ.get(name) or None

    return OrchestratorEnv(
        kubernetes=KubernetesEnv(
            service_host=get("KUBERNETES_SERVICE_HOST"),
            service_port=get("KUBERNETES_SERVICE_PORT"),
        ),
        nomad=NomadEnv(
            addr=get("NOMAD_ADDR"),
            token=get("NOMAD_TOKEN"),
            namespace=get("NOMAD_NAMESPACE"),
            region=get("NOMAD_REGION"),
            skip_verify=get("NOMAD_SKIP_VERIFY"),
            cacert=get("NOMAD_CACERT"),
            capath=get("NOMAD_CAPATH"),
            client_cert=get("NOMAD_CLIENT_CERT"),
            client_key=get("NOMAD_CLIENT_KEY"),
            tls_server_name=get("NOMAD_TLS_SERVER_NAME"),
        ),
    )


@dataclass(frozen=True, slots=True)
class FlagDoc:
    """One flag as the configuration reference (docs/configuration.md) shows it."""

    flag: str
    env: str
    default: str | None
    help: str
    repeatable: bool


class _Parser(argparse.ArgumentParser):
    """argparse prints the whole usage on error; operators want the one line that matters."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.documented: list[FlagDoc] = []

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _typed(convert: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """Wrap a converter so argparse reports `invalid <what>` instead of a Python error."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except (MirrorError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: {exc}") from exc

    parse.__name__ = what
    return parse


def _env_name(flag: str) -> str:
    return "MIRROR_" + flag.lstrip("-").replace("-", "_").upper()


class _FlagAdder:
    """Adds flags whose defaults come from the environment, so both paths share one parser.

    A repeatable flag takes its environment value as a whitespace-separated list, used only when
    the flag is not given at all (given flags replace the environment, they do not add to it).
    """

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
        self._parser = parser
        self._environ = environ

    def __call__(
        self,
        flag: str,
        *,
        default: str | None,
        help: str,
        repeatable: bool = False,
        **kwargs: Any,
    ) -> None:
        env = _env_name(flag)
        value = self._environ.get(env, default)
        # argparse %-formats help texts: a literal % (as in a default of 20%) must be doubled.
        escaped = default.replace("%", "%%") if default is not None else None
        shown = f" (env {env}; default: {escaped})" if escaped is not None else f" (env {env})"
        if isinstance(self._parser, _Parser):
            self._parser.documented.append(FlagDoc(flag, env, default, help, repeatable))
        if repeatable:
            convert = kwargs.pop("type", str)
            self._parser.add_argument(
                flag, action="append", type=convert, help=help + shown + "; repeatable", **kwargs
            )
            from_env = (env, convert, value.split() if value else [])
            self._parser.set_defaults(**{_dest(flag) + _ENV_SUFFIX: from_env})
            return
        self._parser.add_argument(flag, default=value, help=help + shown, **kwargs)


_ENV_SUFFIX = "_from_env"
# Where `mirror run`'s parser keeps the OrchestratorEnv it built (not a flag: no dest clash).
_ORCHESTRATOR_ENV = "orchestrator_env"


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _listed(args: argparse.Namespace, flag: str) -> list[Any]:
    """A repeatable flag's values: from the command line if given, else from the environment."""
    given = getattr(args, _dest(flag))
    if given is not None:
        return list(given)
    env, convert, items = getattr(args, _dest(flag) + _ENV_SUFFIX)
    try:
        return [convert(item) for item in items]
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{env}: {exc}") from exc


# Flags `mirror run` and `mirror configure` share: the same values mean the same thing to both.
_SHARED: dict[str, dict[str, Any]] = {
    "--upstream": {
        "default": None,
        "repeatable": True,
        "type": _typed(parse_upstream, "upstream"),
    },
    "--mirrored-registries": {
        "default": None,
        "repeatable": True,
        "type": _typed(validate_registry, "registry"),
    },
    "--resolve-tags": {"default": "true", "type": _typed(parse_bool, "boolean")},
}


def _add_run(subparsers: Any, environ: Mapping[str, str]) -> None:
    run = subparsers.add_parser("run", help="run the node agent: the registry mirror and metrics")
    flag = _FlagAdder(run, environ)
    flag(
        "--store",
        default=StoreKind.AUTO.value,
        type=_typed(StoreKind, "store"),
        help="where bytes come from: auto (containerd when its socket answers, else Docker "
        "when its socket answers, else the node cache), containerd, docker, or cache",
    )
    flag(
        "--docker-host",
        # The flag wins, then MIRROR_DOCKER_HOST (the adder's part), then DOCKER_HOST.
        default=environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST,
        help="Docker's API socket, unix://PATH or tcp://HOST:PORT: the flag, else "
        "MIRROR_DOCKER_HOST, else DOCKER_HOST (as the docker CLI reads it), else the default",
    )
    flag(
        "--containerd-sock",
        default="/run/containerd/containerd.sock",
        type=Path,
        help="containerd's gRPC socket",
    )
    flag("--containerd-namespace", default="k8s.io", help="containerd namespace to serve")
    flag(
        "--containerd-content-path",
        default=None,
        type=Path,
        help="containerd's content store directory (default: asked from containerd)",
    )
    flag("--cache-dir", default="/var/lib/mirror", type=Path, help="the node cache directory")
    flag(
        "--cache-size",
        default="20%",
        type=_typed(parse_cache_size, "size"),
        help="bound of the node cache (50GiB, 500MB, or a share of its disk such as 20%%); "
        "least recently used blobs are evicted past it",
    )
    flag(
        "--registry-addr",
        default="0.0.0.0:5000",
        type=_typed(parse_address, "address"),
        help="HOST:PORT the registry API listens on",
    )
    flag(
        "--metrics-addr",
        default="0.0.0.0:9090",
        type=_typed(parse_address, "address"),
        help="HOST:PORT serving /metrics",
    )
    flag(
        "--request-head-timeout",
        default="10s",
        type=_typed(parse_duration, "duration"),
        help="a connection to the registry or metrics port must send a whole request head "
        "within this long of opening, or of the first byte of its next request, or it is "
        "closed; a response being sent is never cut",
    )
    flag(
        "--max-connections-per-client",
        default="512",
        type=_typed(parse_connection_cap, "count"),
        help="open connections one client IP may hold on the registry or metrics port; past "
        "it new ones are closed at once (0: no cap)",
    )
    flag(
        "--log-level",
        default=LogLevel.INFO.value,
        type=_typed(LogLevel, "log level"),
        help="debug, info, warning or error",
    )
    flag(
        "--cluster-key-file",
        default=None,
        type=Path,
        help="the cluster key (make one with `mirror keygen`); without it the node runs alone, "
        "with no DHT and no peers",
    )
    flag(
        "--router-addr",
        default="0.0.0.0:5001",
        type=_typed(parse_address, "address"),
        help="HOST:PORT (UDP) of the DHT router",
    )
    flag(
        "--advertise-addr",
        default=None,
        type=_typed(parse_ip, "IP"),
        help="IP peers dial for this node (default: the registry address unless it is a "
        "wildcard, else the primary interface address)",
    )
    flag(
        "--bootstrap",
        default=None,
        repeatable=True,
        help="where to find peers: static:HOST[:PORT][,HOST[:PORT]...], dns:NAME[:PORT] "
        "(every A/AAAA record), kubernetes:NAMESPACE/SERVICE[:PORT] (EndpointSlices) or "
        "nomad:SERVICE[:PORT] (Nomad services); PORT defaults to the router port",
    )
    flag(
        "--dns-server",
        default=None,
        type=_typed(parse_address, "address"),
        help="HOST:PORT of the DNS server for dns: bootstrap (default: /etc/resolv.conf)",
    )
    flag(
        "--resolve-timeout",
        default="20ms",
        type=_typed(parse_duration, "duration"),
        help="deadline of one DHT lookup; a miss never takes longer",
    )
    flag(
        "--advertise-ttl",
        default="10m",
        type=_typed(parse_duration, "duration"),
        help="lifetime of this node's provider records; re-announced at half of it",
    )
    flag(
        "--max-uploads",
        default=str(DEFAULT_MAX_UPLOADS),
        type=_typed(parse_upload_cap, "count"),
        help="blob bodies this node sends to peers at once; past it a peer's request gets a "
        "429 at once and goes to another holder, or to the nodes fetching that blob from this "
        "one (the node's own runtime is never refused, nor the first node fetching a blob no "
        "other node is known to hold, and a peer whose every holder is busy is served "
        "anyway); 0: no bound",
    )
    flag(
        "--blob-fanout",
        default=str(DEFAULT_BLOB_FANOUT),
        type=_typed(parse_upload_cap, "count"),
        help="nodes one blob is sent to at once by this node while they fetch it to share it; "
        "past it another such node's request gets a 429 naming them, and it fetches from one "
        "of them (which serves the blob while it arrives): a rollout becomes a tree about "
        "log2(N) deep (2), or a chain N deep (1); 0: no per-blob bound",
    )
    flag(
        "--peer-ranges",
        default=str(DEFAULT_PEER_RANGES),
        type=_typed(parse_peer_ranges, "count"),
        help="pieces of a whole blob fetched from peers at once: a blob longer than one piece "
        "comes in ranges from several providers in parallel (each piece from the least loaded "
        "when it starts, a node still fetching the blob included), handed on in order and "
        "verified over the whole blob; 1: one stream, from one provider at a time",
    )
    flag(
        "--peer-range-size",
        default="8MiB",
        type=_typed(parse_peer_range_size, "size"),
        help="bytes of each piece with --peer-ranges above 1 (64KiB to 1GiB); at most "
        "--peer-ranges pieces are held in memory per blob",
    )
    flag(
        "--peer-transfer",
        default=PeerTransfer.AUTO.value,
        type=_typed(PeerTransfer, "peer transfer"),
        help="how a blob a peer holds reaches this node's runtime: share (this node fetches it "
        "from the peer, verified, and serves it), redirect (a 307 to a peer that holds it or "
        "whose runtime is receiving it, "
        "at a signed URL good for one GET within 30s: the peer sends the bytes with sendfile and "
        "the runtime checks the digest; a retry within 5 minutes is served as with share; the "
        "runtime must reach the peers' registry port), or auto: redirect on a containerd "
        "store (peers are served from containerd's own download), share on the others",
    )
    flag(
        "--upstream",
        help="REGISTRY=URL: where a registry is really fetched from (default https://REGISTRY; "
        "docker.io is https://registry-1.docker.io)",
        **_SHARED["--upstream"],
    )
    flag(
        "--upstream-fallback",
        default="true",
        type=_typed(parse_bool, "boolean"),
        help="fetch from upstream when no node holds the content; false answers 404 so the "
        "runtime goes upstream itself",
    )
    flag(
        "--registry-auth-file",
        default=None,
        type=Path,
        help="a Docker config.json with credentials for upstream registries",
    )
    flag(
        "--upstream-tag-timeout",
        default="2s",
        type=_typed(parse_duration, "duration"),
        help="how long to wait for upstream to resolve a tag before asking the cluster",
    )
    flag(
        "--upstream-timeout",
        default="10s",
        type=_typed(parse_duration, "duration"),
        help="longest wait for an upstream registry's response headers, token fetch included "
        "(not for the body); past it the request is a 404 and the runtime falls back",
    )
    flag(
        "--resolve-tags",
        help="answer tags from this node and the cluster when upstream does not answer; "
        "false resolves tags only upstream",
        **_SHARED["--resolve-tags"],
    )
    flag(
        "--mirrored-registries",
        help="registries served (default: all); requests for others get a 404 at once",
        **_SHARED["--mirrored-registries"],
    )
    flag(
        "--scrub-rate",
        default="20",
        type=_typed(parse_mib_per_second, "rate"),
        help="MiB/s the background scrub reads to re-hash cached blobs against their digests "
        "(corrupt ones are evicted; blobs served since start go first); 0 turns it off",
    )
    flag(
        "--allow-client",
        default=None,
        repeatable=True,
        type=_typed(parse_cidr, "CIDR"),
        help="CIDR of runtimes allowed to pull besides loopback (peers authenticate instead)",
    )
    _add_prefetch_flags(flag, environ)
    run.set_defaults(**{_ORCHESTRATOR_ENV: orchestrator_env(environ)})


def _add_prefetch_flags(flag: _FlagAdder, environ: Mapping[str, str]) -> None:
    from mirror.prefetch.pinfile import parse_node_label

    flag(
        "--prefetch-file",
        default=None,
        type=Path,
        help="TOML file of images this node keeps in its runtime before they are needed "
        "([[image]] ref, source, nodes); re-read when it changes",
    )
    flag(
        "--node-label",
        default=None,
        repeatable=True,
        type=_typed(parse_node_label, "node label"),
        help="KEY=VALUE label of this node, matched by a pin's nodes table",
    )
    flag(
        "--prefetch-from",
        default=None,
        repeatable=True,
        type=_typed(WorkloadSource, "workload source"),
        help="nomad or kubernetes: pin the images of the workloads that can run on this node "
        "(Nomad jobs; Deployments, DaemonSets, StatefulSets and CronJobs)",
    )
    flag(
        "--prefetch-interval",
        default="5m",
        type=_typed(parse_duration, "duration"),
        help="how often pinned tags are resolved again (a moved tag is taken again) and held "
        "images checked",
    )
    flag(
        "--nomad-datacenter",
        default=environ.get("NOMAD_DC") or None,
        help="this node's Nomad datacenter, for --prefetch-from nomad (default: NOMAD_DC)",
    )
    flag(
        "--nomad-node-pool",
        default="default",
        help="this node's Nomad node pool, for --prefetch-from nomad",
    )
    flag(
        "--kubernetes-namespace",
        default=None,
        help="only this namespace's workloads, for --prefetch-from kubernetes (default: all)",
    )
    flag(
        "--webhook-token-file",
        default=None,
        type=Path,
        help="file holding the token registry webhooks must send (Authorization: Bearer, or "
        "?token= for Docker Hub) to /mirror/v1/events/; without it those endpoints answer 404",
    )
    flag(
        "--node-name",
        default=None,
        type=_typed(parse_node_name, "node name"),
        help="this Kubernetes node's name (the chart sets it from spec.nodeName): with "
        "--prefetch-from kubernetes its labels are read from the API and join --node-label",
    )


def _add_keygen(subparsers: Any) -> None:
    keygen = subparsers.add_parser(
        "keygen", help="print a new cluster key (give every node the same one)"
    )
    keygen.add_argument(
        "--out", type=Path, help="write the key to this file (mode 0600; never overwritten)"
    )


def _add_configure(subparsers: Any, environ: Mapping[str, str]) -> None:
    """`mirror configure containerd|docker|containers`: point the node's runtime at its mirror."""
    from mirror.runtime import containerd_hosts, docker_certs, docker_daemon
    from mirror.runtime.endpoints import DEFAULT_MIRROR, parse_mirror_url

    configure = subparsers.add_parser(
        "configure", help="point the node's container runtime at its mirror (undo: cleanup)"
    )
    runtimes = configure.add_subparsers(dest="runtime", required=True, parser_class=_Parser)
    mirror_help = "URL of this node's mirror, tried before anything else, in the order given"
    mirror_flag: dict[str, Any] = {
        "default": DEFAULT_MIRROR,
        "repeatable": True,
        "type": _typed(parse_mirror_url, "mirror URL"),
    }
    prepend_flag: dict[str, Any] = {
        "default": "false",
        "nargs": "?",
        "const": "true",
        "type": _typed(parse_bool, "boolean"),
        "help": "keep an existing hosts.toml's hosts (after the mirror's) and its server",
    }
    containerd = runtimes.add_parser(
        "containerd", help="write a hosts.toml per registry (containerd, ctr --hosts-dir)"
    )
    flag = _FlagAdder(containerd, environ)
    flag(
        "--config-path",
        default=str(containerd_hosts.DEFAULT_CONFIG_PATH),
        type=Path,
        help="containerd's registry config_path (the directory of <registry>/hosts.toml)",
    )
    flag("--mirror", help=mirror_help, **mirror_flag)
    flag(
        "--mirrored-registries",
        help="registries sent to the mirror (default: all: _default, and every registry "
        "directory already there)",
        **_SHARED["--mirrored-registries"],
    )
    flag(
        "--upstream",
        help="REGISTRY=URL: the server containerd falls back to, as given to `mirror run` "
        "(default https://REGISTRY; docker.io is https://registry-1.docker.io)",
        **_SHARED["--upstream"],
    )
    flag(
        "--resolve-tags",
        help="let the mirror resolve tags; false gives it the pull capability only",
        **_SHARED["--resolve-tags"],
    )
    flag("--prepend-existing", **prepend_flag)

    def configure_containerd(args: argparse.Namespace) -> list[str]:
        return containerd_hosts.configure(
            containerd_hosts.ContainerdHostsConfig(
                config_path=args.config_path,
                mirrors=tuple(_listed(args, "--mirror")),
                registries=tuple(_listed(args, "--mirrored-registries")) or None,
                upstream=tuple(_listed(args, "--upstream")),
                resolve_tags=args.resolve_tags,
                prepend_existing=args.prepend_existing,
            )
        )

    containerd.set_defaults(handler=configure_containerd)
    _add_configure_containers(runtimes, environ, mirror_help, mirror_flag)
    docker = runtimes.add_parser(
        "docker",
        help="add the mirror to registry-mirrors of daemon.json, and write a hosts.toml per "
        "registry under certs.d when dockerd reads them (Docker 28+, containerd image store)",
    )
    flag = _FlagAdder(docker, environ)
    flag(
        "--daemon-json",
        default=str(docker_daemon.DEFAULT_DAEMON_JSON),
        type=Path,
        help="dockerd's configuration file",
    )
    flag("--mirror", help=mirror_help, **mirror_flag)
    flag(
        "--certs-d",
        default=docker_certs.CertsMode.AUTO.value,
        type=_typed(docker_certs.parse_certs_mode, "certs.d mode"),
        help="write a hosts.toml per registry under --certs-dir: auto (when the Engine API "
        "says dockerd reads them: Docker 28+ on the containerd image store; left as they are "
        "when it does not answer), yes, or no (and restore those written before)",
    )
    flag(
        "--certs-dir",
        default=str(docker_certs.DEFAULT_CERTS_DIR),
        type=Path,
        help="dockerd's certs.d directory (rootless dockerd: ~/.config/docker/certs.d)",
    )
    flag(
        "--docker-host",
        default=environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST,
        help="Docker's API socket that --certs-d auto asks: the flag, else MIRROR_DOCKER_HOST, "
        "else DOCKER_HOST, else the default",
    )
    flag(
        "--mirrored-registries",
        help="registries given a hosts.toml (default: all: _default, every registry directory "
        "already there, and each of insecure-registries)",
        **_SHARED["--mirrored-registries"],
    )
    flag(
        "--upstream",
        help="REGISTRY=URL: the server of its hosts.toml, as given to `mirror run` (default "
        "https://REGISTRY; docker.io is https://registry-1.docker.io)",
        **_SHARED["--upstream"],
    )
    flag(
        "--resolve-tags",
        help="let the mirror resolve tags (hosts.toml); false gives it the pull capability only",
        **_SHARED["--resolve-tags"],
    )
    flag("--prepend-existing", **prepend_flag)

    def ask_dockerd(docker_host: str) -> docker_certs.EngineAnswer:
        from mirror.errors import StoreUnavailable
        from mirror.stores.docker import inspect_docker

        try:
            engine = asyncio.run(inspect_docker(docker_host))
        except StoreUnavailable as exc:
            return docker_certs.NoAnswer(str(exc))
        return docker_certs.DaemonStore(engine.version, engine.containerd_image_store)

    def configure_docker(args: argparse.Namespace) -> list[str]:
        config = docker_certs.DockerConfig(
            daemon_json=args.daemon_json,
            mirrors=tuple(_listed(args, "--mirror")),
            certs_dir=args.certs_dir,
            certs=args.certs_d,
            registries=tuple(_listed(args, "--mirrored-registries")) or None,
            upstream=tuple(_listed(args, "--upstream")),
            resolve_tags=args.resolve_tags,
            prepend_existing=args.prepend_existing,
        )
        return docker_certs.configure(config, lambda: ask_dockerd(args.docker_host))

    docker.set_defaults(handler=configure_docker)


def _add_cleanup(subparsers: Any, environ: Mapping[str, str]) -> None:
    """`mirror cleanup containerd|docker|containers`: put back what `configure` replaced."""
    from mirror.runtime import containerd_hosts, docker_certs, docker_daemon

    cleanup = subparsers.add_parser(
        "cleanup", help="restore the runtime configuration `mirror configure` replaced"
    )
    runtimes = cleanup.add_subparsers(dest="runtime", required=True, parser_class=_Parser)
    containerd = runtimes.add_parser("containerd", help="restore the hosts.toml files")
    _FlagAdder(containerd, environ)(
        "--config-path",
        default=str(containerd_hosts.DEFAULT_CONFIG_PATH),
        type=Path,
        help="containerd's registry config_path",
    )
    containerd.set_defaults(handler=lambda args: containerd_hosts.cleanup(args.config_path))
    _add_cleanup_containers(runtimes, environ)
    docker = runtimes.add_parser("docker", help="restore daemon.json and the certs.d hosts.toml")
    flag = _FlagAdder(docker, environ)
    flag(
        "--daemon-json",
        default=str(docker_daemon.DEFAULT_DAEMON_JSON),
        type=Path,
        help="dockerd's configuration file",
    )
    flag(
        "--certs-dir",
        default=str(docker_certs.DEFAULT_CERTS_DIR),
        type=Path,
        help="dockerd's certs.d directory",
    )
    docker.set_defaults(handler=lambda args: docker_certs.cleanup(args.daemon_json, args.certs_dir))


def _add_configure_containers(
    runtimes: Any, environ: Mapping[str, str], mirror_help: str, mirror_flag: dict[str, Any]
) -> None:
    """`mirror configure containers`: a registries.conf.d drop-in for containers/image."""
    from mirror.runtime import containers_registries

    containers = runtimes.add_parser(
        "containers",
        help="write a registries.conf.d drop-in (CRI-O, Podman, Buildah, skopeo)",
    )
    flag = _FlagAdder(containers, environ)
    flag(
        "--registries-dir",
        default=str(containers_registries.DEFAULT_REGISTRIES_DIR),
        type=Path,
        help="containers/image's drop-in directory; the mirror's file there is "
        f"{containers_registries.DROP_IN}",
    )
    flag(
        "--registries-conf",
        default=None,
        type=Path,
        help="containers/image's main file, read for the entries the drop-in replaces "
        "(default: registries.conf beside --registries-dir)",
    )
    flag("--mirror", help=mirror_help, **mirror_flag)
    flag(
        "--mirrored-registries",
        help="registries sent to the mirror (default: "
        f"{', '.join(containers_registries.COMMON_REGISTRIES)}, those of --upstream, and every "
        "registry registries.conf and the drop-ins before ours configure)",
        **_SHARED["--mirrored-registries"],
    )
    flag(
        "--upstream",
        help="REGISTRY=URL: the location the runtime falls back to, as given to `mirror run` "
        "(default: the registry itself)",
        **_SHARED["--upstream"],
    )
    flag(
        "--resolve-tags",
        help="let the mirror resolve tags; false sends it pulls by digest only "
        '(pull-from-mirror = "digest-only")',
        **_SHARED["--resolve-tags"],
    )

    def configure_containers(args: argparse.Namespace) -> list[str]:
        return containers_registries.configure(
            containers_registries.ContainersRegistriesConfig(
                registries_dir=args.registries_dir,
                mirrors=tuple(_listed(args, "--mirror")),
                registries=tuple(_listed(args, "--mirrored-registries")) or None,
                upstream=tuple(_listed(args, "--upstream")),
                resolve_tags=args.resolve_tags,
                main_file=args.registries_conf,
            )
        )

    containers.set_defaults(handler=configure_containers)


def _add_cleanup_containers(runtimes: Any, environ: Mapping[str, str]) -> None:
    """`mirror cleanup containers`: put back the drop-in's original, or remove the drop-in."""
    from mirror.runtime import containers_registries

    containers = runtimes.add_parser("containers", help="restore the registries.conf.d drop-in")
    _FlagAdder(containers, environ)(
        "--registries-dir",
        default=str(containers_registries.DEFAULT_REGISTRIES_DIR),
        type=Path,
        help="containers/image's drop-in directory",
    )
    containers.set_defaults(handler=lambda args: containers_registries.cleanup(args.registries_dir))


# Where the client commands (prefetch, distribute) find the node they ask.
_DEFAULT_NODE = "http://127.0.0.1:5000"


def _add_client_flags(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """`--node` and `--timeout`, shared by the commands that ask a running node."""
    parser.add_argument(
        "--node",
        default=environ.get("MIRROR_NODE", _DEFAULT_NODE),
        help=f"the node's registry address (env MIRROR_NODE; default: {_DEFAULT_NODE})",
    )
    parser.add_argument(
        "--timeout",
        default="30m",
        type=_typed(parse_duration, "duration"),
        help="give up after this long (default: 30m)",
    )


def _add_prefetch(subparsers: Any, environ: Mapping[str, str]) -> None:
    prefetch = subparsers.add_parser(
        "prefetch",
        help="ask a node to take an image into its runtime now, and follow it until held",
    )
    prefetch.add_argument("ref", help="the image, as the runtime will name it (tag or digest)")
    prefetch.add_argument(
        "--source",
        default=None,
        help="where to take it from when REF cannot be resolved; tagged locally as REF",
    )
    _add_client_flags(prefetch, environ)


def _add_distribute(subparsers: Any, environ: Mapping[str, str]) -> None:
    distribute = subparsers.add_parser(
        "distribute",
        help="spread a pushed tag to every node that follows it, and show each node's progress",
    )
    distribute.add_argument("ref", help="the image tag, as pushed (registry/repository:tag)")
    _add_client_flags(distribute, environ)


def _add_status(subparsers: Any, environ: Mapping[str, str]) -> None:
    status = subparsers.add_parser(
        "status",
        help="show a node: its peers, what it holds, recent pulls, upstream health, pins and "
        "distributions (the page on --metrics-addr shows the same)",
    )
    status.add_argument(
        "--node",
        default=environ.get("MIRROR_NODE", _DEFAULT_NODE),
        help=f"the node's registry or metrics address (env MIRROR_NODE; default: {_DEFAULT_NODE})",
    )
    status.add_argument("--json", action="store_true", help="print the node's JSON report as it is")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A cluster-local OCI registry mirror.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run(subparsers, environ)
    _add_keygen(subparsers)
    _add_configure(subparsers, environ)
    _add_cleanup(subparsers, environ)
    _add_prefetch(subparsers, environ)
    _add_distribute(subparsers, environ)
    _add_status(subparsers, environ)
    return parser


def routing_config(args: argparse.Namespace) -> RoutingConfig:
    from mirror.clusterkey import ClusterKey
    from mirror.routing.bootstrap import parse_bootstrap

    dns_server = (args.dns_server.host, args.dns_server.port) if args.dns_server else None
    specs = _listed(args, "--bootstrap")
    if specs and args.cluster_key_file is None:
        raise ConfigError("--bootstrap needs --cluster-key-file: peers must authenticate")
    env = getattr(args, _ORCHESTRATOR_ENV)
    return RoutingConfig(
        cluster_key=ClusterKey.load(args.cluster_key_file) if args.cluster_key_file else None,
        router_addr=args.router_addr,
        advertise_ip=args.advertise_addr,
        bootstrap=tuple(
            parse_bootstrap(spec, args.router_addr.port, dns_server=dns_server, env=env)
            for spec in specs
        ),
        resolve_timeout=args.resolve_timeout,
        advertise_ttl=args.advertise_ttl,
        allow_clients=tuple(_listed(args, "--allow-client")),
        peer_transfer=args.peer_transfer,
        max_uploads=args.max_uploads,
        blob_fanout=args.blob_fanout,
        peer_ranges=args.peer_ranges,
        peer_range_size=args.peer_range_size,
    )


def upstream_config(args: argparse.Namespace) -> UpstreamConfig:
    return UpstreamConfig(
        fallback=args.upstream_fallback,
        overrides=tuple(_listed(args, "--upstream")),
        auth_file=args.registry_auth_file,
        tag_timeout=args.upstream_tag_timeout,
        timeout=args.upstream_timeout,
    )


def run_config(args: argparse.Namespace) -> RunConfig:
    mirrored = _listed(args, "--mirrored-registries")
    return RunConfig(
        store=args.store,
        containerd=ContainerdConfig(
            socket=args.containerd_sock,
            namespace=args.containerd_namespace,
            content_path=args.containerd_content_path,
        ),
        docker_host=args.docker_host,
        cache_dir=args.cache_dir,
        cache_size=args.cache_size,
        registry_addr=args.registry_addr,
        metrics_addr=args.metrics_addr,
        http_limits=HttpLimits(
            request_head_timeout=args.request_head_timeout,
            max_connections_per_client=args.max_connections_per_client,
        ),
        log_level=args.log_level,
        routing=routing_config(args),
        upstream=upstream_config(args),
        mirrored_registries=frozenset(mirrored) if mirrored else None,
        resolve_tags=args.resolve_tags,
        scrub_rate=args.scrub_rate,
        prefetch=prefetch_config(args),
    )


def prefetch_config(args: argparse.Namespace) -> PrefetchConfig:
    from mirror.prefetch.pinfile import node_labels
    from mirror.routing.bootstrap.kubernetes import in_cluster_settings
    from mirror.routing.bootstrap.nomad import nomad_settings

    workloads = tuple(dict.fromkeys(_listed(args, "--prefetch-from")))
    env: OrchestratorEnv = getattr(args, _ORCHESTRATOR_ENV)
    nomad = kubernetes = None
    if WorkloadSource.NOMAD in workloads:
        if not args.nomad_datacenter:
            raise ConfigError("--prefetch-from nomad needs --nomad-datacenter (or NOMAD_DC)")
        nomad = nomad_settings(
            lambda problem: ConfigError(f"--prefetch-from nomad: {problem}"), env.nomad
        )
    if WorkloadSource.KUBERNETES in workloads:
        kubernetes = in_cluster_settings(
            env.kubernetes, lambda problem: ConfigError(f"--prefetch-from kubernetes: {problem}")
        )
    return PrefetchConfig(
        file=args.prefetch_file,
        node_labels=tuple(node_labels(_listed(args, "--node-label")).items()),
        workloads=workloads,
        recheck=args.prefetch_interval,
        nomad=nomad,
        nomad_datacenter=args.nomad_datacenter,
        nomad_node_pool=args.nomad_node_pool,
        kubernetes=kubernetes,
        kubernetes_namespace=args.kubernetes_namespace,
        node_name=args.node_name,
        webhook_token=_webhook_token(args.webhook_token_file),
    )


def _webhook_token(path: Path | None) -> bytes | None:
    """The token in `path`, surrounding whitespace removed; ConfigError if unusable."""
    if path is None:
        return None
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"--webhook-token-file {path}: {exc.strerror or exc}") from exc
    if len(token) < 16:
        raise ConfigError(f"--webhook-token-file {path}: the token must be 16 bytes or more")
    return token


def keygen(out: Path | None) -> None:
    from mirror.clusterkey import ClusterKey

    key = ClusterKey.generate()
    if out is None:
        print(key)
        return
    try:
        descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"{out} exists; not overwriting a cluster key") from exc
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror}") from exc
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key + "\n")
    print(f"wrote a new cluster key to {out}")


def _say(text: str) -> None:
    """A progress line of `mirror prefetch` or `mirror distribute`, shown at once."""
    print(text, flush=True)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = build_parser(os.environ if environ is None else environ)
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            keygen(args.out)
        elif args.command == "run":
            from mirror.node import run_node

            config = run_config(args)
            logging.basicConfig(
                level=config.log_level.upper(),
                format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            )
            asyncio.run(run_node(config))
        elif args.command == "prefetch":
            from mirror.prefetch.client import node_url, prefetch

            line = asyncio.run(
                prefetch(
                    node_url(args.node),
                    args.ref,
                    args.source,
                    timeout=args.timeout,
                    say=_say,
                )
            )
            print(line)
        elif args.command == "distribute":
            from mirror.prefetch.client import distribute, node_url

            print(
                asyncio.run(
                    distribute(node_url(args.node), args.ref, timeout=args.timeout, say=_say)
                )
            )
        elif args.command == "status":
            from mirror.prefetch.client import node_url
            from mirror.status.client import show_status

            plain = (os.environ if environ is None else environ).get("NO_COLOR")
            colour = sys.stdout.isatty() and not plain
            print(asyncio.run(show_status(node_url(args.node), as_json=args.json, colour=colour)))
        elif args.command in ("configure", "cleanup"):
            for line in args.handler(args):
                print(line)
    except MirrorError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def variable_reference() -> dict[str, str]:
    """The variables besides MIRROR_<FLAG> that `mirror run` reads, with their meaning."""
    return dict(OTHER_VARIABLES)


def flag_reference() -> dict[str, list[FlagDoc]]:
    """Every documented flag, by command (`run`, `configure containerd`, ...)."""
    found: dict[str, list[FlagDoc]] = {}

    def walk(parser: argparse.ArgumentParser, command: str) -> None:
        if isinstance(parser, _Parser) and parser.documented:
            found[command] = list(parser.documented)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{command} {name}".strip())

    walk(build_parser({}), "")
    return found
