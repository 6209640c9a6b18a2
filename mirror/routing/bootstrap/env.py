"""What the orchestrator clients read from the process environment, as one typed object.

`mirror/cli.py` builds it once from the environment it was given (no other module reads the
environment) and hands it to `parse_bootstrap`; a `kubernetes:` or `nomad:` source takes its
part. Values are kept as given and checked only when such a source is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Where Kubernetes mounts a pod's service account (token, ca.crt, namespace).
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True, slots=True)
class KubernetesEnv:
    """How a pod reaches its API server, as client-go's in-cluster config finds it.

    The values are kept as given (``None`` when unset or empty) and checked only by a
    ``kubernetes:`` bootstrap spec, so a node that does not use one never fails on them.
    """

    service_host: str | None = None  # KUBERNETES_SERVICE_HOST
    service_port: str | None = None  # KUBERNETES_SERVICE_PORT
    service_account_dir: Path = SERVICE_ACCOUNT_DIR


@dataclass(frozen=True, slots=True)
class NomadEnv:
    """The ``NOMAD_*`` variables the ``nomad`` CLI reads, as given (``None``: unset or empty).

    Checked only by a ``nomad:`` bootstrap spec, like KubernetesEnv.
    """

    addr: str | None = None  # NOMAD_ADDR
    token: str | None = None  # NOMAD_TOKEN
    namespace: str | None = None  # NOMAD_NAMESPACE
    region: str | None = None  # NOMAD_REGION
    skip_verify: str | None = None  # NOMAD_SKIP_VERIFY
    cacert: str | None = None  # NOMAD_CACERT
    capath: str | None = None  # NOMAD_CAPATH
    client_cert: str | None = None  # NOMAD_CLIENT_CERT
    client_key: str | None = None  # NOMAD_CLIENT_KEY
    tls_server_name: str | None = None  # NOMAD_TLS_SERVER_NAME


@dataclass(frozen=True, slots=True)
class OrchestratorEnv:
    """What the orchestrator running this node told it, for ``kubernetes:`` and ``nomad:``.

    The default is an orchestrator that said nothing: enough for ``static:`` and ``dns:``.
    """

    kubernetes: KubernetesEnv = field(default_factory=KubernetesEnv)
    nomad: NomadEnv = field(default_factory=NomadEnv)
