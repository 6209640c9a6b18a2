"""The Helm chart through the real tools: helm renders and lints it, kubernetes-validate checks
what it renders against the Kubernetes API schemas.

helm is the real binary that ``bin/setup-env`` installs into ``.tools/bin`` (from an npm
package; see there). kubernetes-validate is a Python test dependency, installed in the venv
with its command next to the interpreter. Both are looked up here and a missing one is an
error naming the command that installs it: the chart tests fail, they never skip.

Custom resources (the Prometheus Operator's ServiceMonitor and PrometheusRule) have no schema
in kubernetes-validate, which only knows Kubernetes' own kinds: it warns that it found none.
Those warnings, and only for those kinds, are accepted; every other document must pass.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
CHART = ROOT / "charts" / "mirror"
HELM = ROOT / ".tools" / "bin" / "helm"
HELM_VERSION = "v4.1.4"
KUBE_VERSION = "1.33.0"
KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
RELEASE = "mirror"
NAMESPACE = "mirror-system"

# (apiVersion, kind) of the custom resources the chart can render: no schema to check them by.
CUSTOM_RESOURCES = frozenset(
    {
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    }
)

IMAGE_REPOSITORY = "registry.example.com/platform/mirror"
CLUSTER_KEY = "c2FtcGxlLWNsdXN0ZXIta2V5LWZvci10ZXN0cy0wMDA="  # base64 of 32 bytes

PREFETCH_IMAGES: list[dict[str, Any]] = [
    {
        "ref": "registry.internal:5000/infra/traefik:v2.10",
        "source": "docker.io/library/traefik:v2.10",
    },
    {
        "ref": "registry.internal:5000/infra/registry:2.8",
        "source": "",
        "nodes": {"role": "edge", "rack": 1, "gpu": True, "node-role.kubernetes.io/edge": ""},
    },
    # Quoting: JSON escapes that TOML reads back, and characters beyond the BMP as they are.
    {"ref": "busybox@sha256:" + "0" * 64, "nodes": {"site": 'zürich-"<&>"\\🚀'}},
]

# The value sets the chart is linted, rendered and validated with, each on top of an image
# (image.repository has no default): what operators turn on, alone or together.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "dashboard": {"enabled": True, "annotations": {"grafana_folder": "Platform"}},
    },
    "existing-secrets": {
        "cluster": {"existingSecret": "mirror-cluster-key", "secretKey": "key"},
        "mirror": {"registryAuth": {"existingSecret": "registry-credentials"}},
    },
    "host-ports": {"network": {"hostNetwork": False}, "mirror": {"allowClients": ["10.0.0.0/8"]}},
    "docker-store": {"mirror": {"store": "docker"}},
    "prefetch": {
        "prefetch": {
            "images": PREFETCH_IMAGES,
            "fromWorkloads": True,
            "namespace": "apps",
            "nodeLabels": {"site": "paris", "role": "edge"},
            "interval": "2m",
        }
    },
    "alerts-and-policy": {
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {
            "enabled": True,
            "labels": {"release": "prometheus"},
            "extraRules": [
                {
                    "alert": "MirrorNoPeers",
                    "expr": "mirror_dht_contacts == 0",
                    "for": "30m",
                    "labels": {"severity": "info"},
                }
            ],
        },
        "networkPolicy": {"enabled": True, "nodeCIDRs": ["10.0.0.0/16", "fd00::/64"]},
    },
    "cri-o": {"configure": {"runtime": "containers"}, "mirror": {"store": "cache"}},
    "dns-bootstrap": {
        "image": {"digest": "sha256:" + "a" * 64},
        "cluster": {
            "key": CLUSTER_KEY,
            "bootstrap": {"mode": "dns", "extra": ["static:10.0.0.5:5001"]},
        },
        "mirror": {"upstreams": ["docker.io=https://registry-mirror.internal"]},
        "priorityClassName": "system-node-critical",
    },
    "standalone": {
        "cluster": {"enabled": False},
        "configure": {"enabled": False},
        "cleanup": {"onStop": False},
        "cache": {"hostPath": ""},
        "serviceAccount": {"create": False},
        "rbac": {"create": False},
    },
}


def merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, maps merged key by key as helm merges values files."""
    result = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def chart_values(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Values with the image set, then each layer over them."""
    values: dict[str, Any] = {"image": {"repository": IMAGE_REPOSITORY}}
    for layer in layers:
        values = merged(values, layer)
    return values


_SETUP = "run bin/setup-env --system (bin/test does) to install it"


class ToolMissing(RuntimeError):
    """helm or kubernetes-validate is not installed where the tests look for it."""


class ChartError(AssertionError):
    """helm refused the chart, or a rendered manifest failed validation."""


@functools.cache
def helm_binary() -> Path:
    """The helm the tests run, checked once: installed, and the version setup-env pins."""
    if not HELM.is_file():
        raise ToolMissing(f"helm is not installed at {HELM}: {_SETUP}")
    version = _run([str(HELM), "version", "--template", "{{.Version}}"]).stdout.strip()
    if version != HELM_VERSION:
        raise ToolMissing(f"{HELM} is helm {version}, not {HELM_VERSION}: {_SETUP}")
    return HELM


def kubernetes_validate_binary() -> Path:
    if not KUBERNETES_VALIDATE.is_file():
        raise ToolMissing(
            f"kubernetes-validate is not installed at {KUBERNETES_VALIDATE}: {_SETUP}"
        )
    return KUBERNETES_VALIDATE


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def _values_file(directory: Path, values: Mapping[str, Any]) -> Path:
    path = directory / "values.yaml"
    # JSON is YAML, with no PyYAML quirks (line width, tags) between the test and helm; but
    # characters beyond the BMP as they are: YAML has no surrogate pair escapes.
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


@dataclass(frozen=True)
class Rendered:
    """What `helm template` printed for one set of values, and its documents."""

    text: str
    documents: tuple[dict[str, Any], ...]

    def kinds(self) -> list[str]:
        return [document["kind"] for document in self.documents]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [document for document in self.documents if document["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.all(kind)
        if len(found) != 1:
            raise ChartError(f"expected one {kind}, the chart rendered {len(found)}")
        return found[0]

    def has(self, kind: str) -> bool:
        return bool(self.all(kind))


def _helm(
    command: str, values: Mapping[str, Any], *options: str
) -> subprocess.CompletedProcess[str]:
    """`helm COMMAND ... --values FILE` for Kubernetes KUBE_VERSION, in the release namespace."""
    with tempfile.TemporaryDirectory(prefix="mirror-helm-") as directory:
        return _run(
            [
                str(helm_binary()),
                command,
                *options,
                str(CHART),
                "--namespace",
                NAMESPACE,
                "--kube-version",
                KUBE_VERSION,
                "--values",
                str(_values_file(Path(directory), values)),
            ]
        )


def render(values: Mapping[str, Any]) -> Rendered:
    """`helm template RELEASE CHART` with these values: the manifests and their documents."""
    result = _helm("template", values, RELEASE)
    if result.returncode != 0:
        raise ChartError(f"helm template failed:\n{result.stderr}")
    documents = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)
    return Rendered(result.stdout, documents)


def render_error(values: Mapping[str, Any]) -> str:
    """The error `helm template` stops with, for values the chart must refuse."""
    result = _helm("template", values, RELEASE)
    if result.returncode == 0:
        raise ChartError("helm template rendered values the chart should refuse")
    return result.stderr


def lint(values: Mapping[str, Any]) -> str:
    """`helm lint --strict` with these values; its output when it passes."""
    result = _helm("lint", values, "--strict")
    if result.returncode != 0:
        raise ChartError(f"helm lint --strict failed:\n{result.stdout}{result.stderr}")
    return result.stdout


_PASSED = re.compile(r"^INFO (?P<file>.+) passed for resource (?P<resource>\S+) against version")
_NO_SCHEMA = re.compile(
    r"^WARN (?P<file>.+) Couldn't find schema for kind (?P<kind>\S+) "
    r"with api version (?P<api>\S+) for kubernetes version"
)


@dataclass(frozen=True)
class Validation:
    """What kubernetes-validate said: resources that passed (``kind/name``, lower-case kind, as
    it prints them) and custom resources it had no schema for (apiVersion, kind)."""

    passed: tuple[str, ...]
    unchecked: tuple[tuple[str, str], ...]


def validate(rendered: Rendered) -> Validation:
    """`kubernetes-validate -k KUBE_VERSION --strict` on every rendered document.

    Fails on any error or warning, except a missing schema for a custom resource of
    CUSTOM_RESOURCES; checks that every other document was validated.
    """
    with tempfile.TemporaryDirectory(prefix="mirror-validate-") as directory:
        manifest = Path(directory) / "rendered.yaml"
        manifest.write_text(rendered.text)
        result = _run(
            [
                str(kubernetes_validate_binary()),
                "--kubernetes-version",
                KUBE_VERSION,
                "--strict",
                str(manifest),
            ]
        )
    passed: list[str] = []
    unchecked: list[tuple[str, str]] = []
    unexpected: list[str] = []
    for line in (result.stdout + result.stderr).splitlines():
        if match := _PASSED.match(line):
            passed.append(match["resource"])
        elif (match := _NO_SCHEMA.match(line)) and (match["api"], match["kind"]) in (
            CUSTOM_RESOURCES
        ):
            unchecked.append((match["api"], match["kind"]))
        elif line.strip():
            unexpected.append(line)
    if result.returncode != 0 or unexpected:
        raise ChartError(
            f"kubernetes-validate -k {KUBE_VERSION} --strict (exit {result.returncode}):\n"
            + "\n".join(unexpected)
        )
    expected = sorted(
        f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        for doc in rendered.documents
        if (doc["apiVersion"], doc["kind"]) not in CUSTOM_RESOURCES
    )
    if sorted(passed) != expected:
        raise ChartError(f"kubernetes-validate checked {sorted(passed)}, not {expected}")
    return Validation(tuple(passed), tuple(unchecked))
