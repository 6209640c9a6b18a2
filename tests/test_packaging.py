"""Deployment files: the Helm chart, the Nomad jobs and the Dockerfile agree with the program.

The chart is rendered by the real helm (``harness.helm``: installed by bin/setup-env, never
skipped) and its output read here: every ``MIRROR_*`` variable the chart and the Nomad jobs set
is a real flag of ``mirror run``; the argument lists and environments they give mirror pass its
own parser (``build_parser``, ``run_config``, ``parse_bootstrap``); the cluster key and the
prefetch file the chart writes are ones mirror reads, with the pins meant. Statically: the
chart's values exist, are documented and used, the Nomad jobs parse as HCL and use only
job-specification names, the dashboard only queries metrics the program exports, and the
Dockerfile installs the pinned dependencies and drops root. tests/test_helm.py lints the chart
and validates what it renders against the Kubernetes schemas.

values.yaml and Chart.yaml are read with PyYAML; the Nomad jobs with python-hcl2 (both test
dependencies, like pytest).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import re
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import helm
from harness.helm import PREFETCH_IMAGES, VALUE_SETS, Rendered, chart_values

from mirror.cli import build_parser, flag_reference, run_config
from mirror.clusterkey import ClusterKey
from mirror.config import RunConfig, WorkloadSource
from mirror.metrics import Metrics
from mirror.prefetch.model import Pin, parse_image_ref
from mirror.prefetch.pinfile import parse_pins
from mirror.routing.bootstrap import parse_bootstrap
from mirror.routing.bootstrap.env import KubernetesEnv, OrchestratorEnv

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "mirror"
TEMPLATES = CHART / "templates"
NOMAD_JOBS = sorted((ROOT / "nomad").glob("*.nomad.hcl"))
DOCKERFILE = ROOT / "Dockerfile"


# --- values.yaml and Chart.yaml ---------------------------------------------------------------

# Plain scalars YAML 1.1 (PyYAML, helm's converter in places) reads as booleans and YAML 1.2
# as strings: values.yaml must quote them.
_AMBIGUOUS = {"y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO"}
_AMBIGUOUS |= {"on", "On", "ON", "off", "Off", "OFF"}


@dataclass(frozen=True)
class YamlFile:
    """A YAML file's data, the line of every mapping key (by path) and of every full-line
    comment, so a test can ask whether a key is documented."""

    data: Any
    key_lines: dict[tuple[Any, ...], int]
    comment_lines: frozenset[int]


def read_yaml(text: str, where: str) -> YamlFile:
    """Read with PyYAML; a duplicate key or an ambiguous plain scalar (yes, on...) fails."""
    key_lines: dict[tuple[Any, ...], int] = {}

    def walk(node: yaml.Node, at: tuple[Any, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                line = key.start_mark.line + 1
                assert (*at, key.value) not in key_lines, f"{where}:{line}: duplicate key"
                key_lines[(*at, key.value)] = line
                walk(value, (*at, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*at, index))
        elif isinstance(node, yaml.ScalarNode) and node.style is None:
            assert node.value not in _AMBIGUOUS, (
                f"{where}:{node.start_mark.line + 1}: quote the ambiguous {node.value!r}"
            )

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    comments = frozenset(
        number
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip().startswith("#")
    )
    return YamlFile(yaml.safe_load(text), key_lines, comments)


def load_yaml(path: Path) -> YamlFile:
    return read_yaml(path.read_text(), str(path.relative_to(ROOT)))


def test_yaml_reader_refuses_what_it_could_misread() -> None:
    for bad in ("a: 1\na: 2\n", "a:\n  b: yes\n", "a: [on]\n"):
        with pytest.raises(AssertionError):
            read_yaml(bad, "bad")
    doc = read_yaml('# comment\na:\n  b: "yes"\n  c: [1, x]\n', "good")
    assert doc.data == {"a": {"b": "yes", "c": [1, "x"]}}
    assert doc.key_lines == {("a",): 2, ("a", "b"): 3, ("a", "c"): 4}
    assert doc.comment_lines == {1}


# --- the Helm chart: values, README, templates ------------------------------------------------


@pytest.fixture(scope="module")
def values() -> YamlFile:
    return load_yaml(CHART / "values.yaml")


def _template_texts() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(TEMPLATES.iterdir()) if path.is_file()}


def _values_references() -> set[tuple[str, ...]]:
    found = set()
    for text in _template_texts().values():
        for match in re.finditer(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text):
            found.add(tuple(match.group(1).lstrip(".").split(".")))
    return found


def _documented_values() -> dict[tuple[str, ...], str]:
    """Rows of the README's values table: path -> default column."""
    text = (CHART / "README.md").read_text()
    section = text.split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `([A-Za-z0-9_.]+)` \| (.*?) \| (.+) \|$", line)
        if match:
            rows[tuple(match.group(1).split("."))] = match.group(2)
    return rows


def _leaf_paths(data: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _leaf_paths(value, (*path, key))
    else:
        yield path


def _covered(path: tuple[str, ...], prefixes: set[tuple[str, ...]]) -> bool:
    return any(path[: len(prefix)] == prefix for prefix in prefixes)


def test_chart_yaml() -> None:
    chart = load_yaml(CHART / "Chart.yaml").data
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "mirror" and chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"], "appVersion is the image tag by default"


def test_every_value_used_in_templates_exists(values: YamlFile) -> None:
    missing = []
    for path in sorted(_values_references()):
        node: Any = values.data
        for key in path:
            if not isinstance(node, dict) or key not in node:
                missing.append(".".join(path))
                break
            node = node[key]
    assert not missing, f"templates use values that values.yaml does not define: {missing}"


def test_every_value_is_documented_and_used(values: YamlFile) -> None:
    documented = _documented_values()
    references = _values_references()
    assert documented, "README.md has no values table"
    # Every value in values.yaml is a documented row or inside one (a map passed to toYaml).
    undocumented = [p for p in _leaf_paths(values.data) if not _covered(p, set(documented))]
    assert not undocumented, f"values missing from the README table: {undocumented}"
    for path in documented:
        assert path in values.key_lines, f"README documents {'.'.join(path)}, not in values.yaml"
        # ... with a comment right above its key in values.yaml,
        line = values.key_lines[path]
        assert line - 1 in values.comment_lines, f"values.yaml:{line}: no comment above the key"
        # ... and read by some template (itself, a part of it, or a map containing it).
        assert any(ref[: len(path)] == path or path[: len(ref)] == ref for ref in references), (
            f"{'.'.join(path)} is documented but no template uses it"
        )
    # The parent keys grouping values are commented too.
    for path, line in values.key_lines.items():
        if any(isinstance(part, int) for part in path) or _covered(path[:-1], set(documented)):
            continue
        assert line - 1 in values.comment_lines, f"values.yaml:{line}: no comment above the key"


def test_chart_defaults(values: YamlFile) -> None:
    data = values.data
    assert data["network"]["hostNetwork"] is True
    assert data["tolerations"] == [{"operator": "Exists"}], "every taint is tolerated"
    assert data["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert data["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert data["readinessProbe"]["httpGet"]["port"] == "registry"
    assert data["serviceMonitor"]["enabled"] is False and data["dashboard"]["enabled"] is False
    assert data["prometheusRule"]["enabled"] is False
    assert data["networkPolicy"]["enabled"] is False
    assert data["configure"]["runtime"] == "containerd"
    assert data["cluster"]["bootstrap"]["mode"] == "kubernetes"
    assert "maxSurge" not in data["updateStrategy"].get("rollingUpdate", {})


# --- the Helm chart as helm renders it --------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _helm_installed() -> None:
    try:
        helm.helm_binary()
    except helm.ToolMissing as missing:
        pytest.fail(str(missing), pytrace=False)


def _render(*layers: Mapping[str, Any]) -> Rendered:
    return helm.render(chart_values(*layers))


def _pod(rendered: Rendered) -> dict[str, Any]:
    spec: dict[str, Any] = rendered.one("DaemonSet")["spec"]["template"]["spec"]
    return spec


def _container(rendered: Rendered, name: str) -> dict[str, Any]:
    pod = _pod(rendered)
    (found,) = [c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name]
    return found


def _env(container: Mapping[str, Any]) -> dict[str, str]:
    """A container's environment: name -> value, or `fieldRef:PATH` for the downward API."""
    env = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            env[entry["name"]] = "fieldRef:" + entry["valueFrom"]["fieldRef"]["fieldPath"]
    return env


def _kubernetes_expand(text: str, env: Mapping[str, str]) -> str:
    """$(VAR) in args and env values, as the kubelet expands them from the container's env."""
    return re.sub(r"\$\((\w+)\)", lambda match: env[match[1]], text)


# What the downward API gives the pod on a sample node.
SAMPLE_NODE = {"status.hostIP": "192.0.2.10", "spec.nodeName": "node-1"}


def _node_env(container: Mapping[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet makes it on the sample node."""
    env: dict[str, str] = {}
    for name, value in _env(container).items():
        if value.startswith("fieldRef:"):
            env[name] = SAMPLE_NODE[value.removeprefix("fieldRef:")]
        else:
            env[name] = _kubernetes_expand(value, env)
    return env


def test_daemonset_wiring() -> None:
    rendered = _render()
    mirror = _container(rendered, "mirror")
    env = _env(mirror)
    # The advertised address is the node's, from the downward API.
    assert env["MIRROR_ADVERTISE_ADDR"] == "fieldRef:status.hostIP"
    assert _pod(rendered)["hostNetwork"] is True
    assert _pod(rendered)["automountServiceAccountToken"] is True  # kubernetes bootstrap
    assert _container(rendered, "configure-containerd")["args"][:2] == ["configure", "containerd"]
    assert mirror["lifecycle"]["preStop"]["exec"]["command"][:2] == ["mirror", "cleanup"]
    assert mirror["lifecycle"]["postStart"]["exec"]["command"][:2] == ["/bin/sh", "-c"]
    # containerd is mounted read-only; the hosts.toml directory is the one written.
    mounts = {mount["name"]: mount for mount in mirror["volumeMounts"]}
    assert mounts["containerd-run"] == {
        "name": "containerd-run",
        "mountPath": "/run/containerd",
        "readOnly": True,
    }
    assert mounts["containerd-content"]["readOnly"] is True
    assert "readOnly" not in mounts["containerd-certs"]
    assert mounts["containerd-content"]["mountPath"] == env["MIRROR_CONTAINERD_CONTENT_PATH"]
    role = rendered.one("Role")
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    service = rendered.one("Service")["spec"]
    assert service["clusterIP"] == "None"
    assert {(port["name"], port["protocol"]) for port in service["ports"]} == {
        ("registry", "TCP"),
        ("router", "UDP"),
        ("metrics", "TCP"),
    }


def test_cluster_key_secret_is_generated_once_in_a_form_the_program_reads() -> None:
    secret = (TEMPLATES / "secret.yaml").read_text()
    # Kept on upgrades: the Secret already in the cluster is looked up first (helm template
    # cannot look up, so it renders a fresh key, as below).
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in secret
    keys = set()
    for _ in range(3):
        rendered = _render()
        data = rendered.one("Secret")["data"]
        text = base64.b64decode(data["cluster.key"]).decode()  # the mounted file's text
        ClusterKey.from_text(text)  # raises ConfigError if not accepted
        assert len(base64.urlsafe_b64decode(text)) == 32
        keys.add(text)
    assert len(keys) == 3, "a fresh random key each time there is none"
    # An explicit key is the one every node reads.
    rendered = _render({"cluster": {"key": helm.CLUSTER_KEY}})
    data = rendered.one("Secret")["data"]
    assert base64.b64decode(data["cluster.key"]).decode() == helm.CLUSTER_KEY
    # An existing Secret: none created, that one mounted with its key.
    rendered = _render(VALUE_SETS["existing-secrets"])
    assert not rendered.has("Secret")
    (volume,) = [v for v in _pod(rendered)["volumes"] if v["name"] == "cluster-key"]
    assert volume["secret"]["secretName"] == "mirror-cluster-key"
    assert volume["secret"]["items"] == [{"key": "key", "path": "key"}]
    assert _env(_container(rendered, "mirror"))["MIRROR_CLUSTER_KEY_FILE"] == (
        "/etc/mirror/cluster/key"
    )


def _metric_names() -> set[str]:
    """Every sample name the program can export (counters with _total, histograms' series)."""
    names = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count", "")}
        else:
            names.add(family.name)
    return names


def test_dashboard_queries_real_metrics() -> None:
    dashboard = json.loads((CHART / "dashboards" / "mirror.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs
    used = {name for expr in exprs for name in re.findall(r"\bmirror_[a-z_]+", expr)}
    unknown = used - _metric_names()
    assert not unknown, f"the dashboard queries metrics the program does not export: {unknown}"
    for needed in (
        "mirror_requests_total",
        "mirror_request_duration_seconds_bucket",
        "mirror_served_bytes_total",
        "mirror_upstream_bytes_total",
        "mirror_coalesced_waits_total",
        "mirror_cache_bytes",
        "mirror_peer_lookup_duration_seconds_bucket",
        "mirror_dht_contacts",
        "mirror_advertised_keys",
        "mirror_dht_dropped_datagrams_total",
        "mirror_refused_requests_total",
    ):
        assert needed in used, f"the dashboard does not show {needed}"
    # What the chart ships is this file.
    rendered = _render(VALUE_SETS["monitoring"])
    (configmap,) = rendered.all("ConfigMap")
    assert json.loads(configmap["data"]["mirror.json"]) == dashboard


# --- mirror's own flags -----------------------------------------------------------------------


def _run_env_names() -> set[str]:
    """MIRROR_<FLAG> of every `mirror run` flag, as mirror.cli names them."""
    return {doc.env for doc in flag_reference()["run"]}


def test_chart_env_vars_are_run_flags() -> None:
    names = set()
    for layer in VALUE_SETS.values():
        rendered = _render(layer)
        for container in _pod(rendered)["containers"] + _pod(rendered).get("initContainers", []):
            names |= {name for name in _env(container) if name.startswith("MIRROR_")}
    assert {"MIRROR_ADVERTISE_ADDR", "MIRROR_BOOTSTRAP", "MIRROR_CLUSTER_KEY_FILE"} <= names
    assert {"MIRROR_PREFETCH_FILE", "MIRROR_NODE_NAME", "MIRROR_REGISTRY_AUTH_FILE"} <= names
    unknown = names - _run_env_names()
    assert not unknown, f"the chart sets variables that are no `mirror run` flag: {unknown}"


def _parse(argv: list[str], environ: dict[str, str] | None = None) -> argparse.Namespace:
    try:
        return build_parser(environ or {}).parse_args(argv)
    except SystemExit:
        pytest.fail(f"mirror rejects {argv}: see its error above", pytrace=False)


def _hook_argv(command: list[str], env: Mapping[str, str]) -> list[str]:
    """The argv the postStart hook's `sh -c 'exec mirror "$@" --mirror="$VAR"' NAME ARGS...`
    runs: the arguments as given (never parsed by the shell), then the mirror URL."""
    shell, flag, script, _name, *args = command
    assert (shell, flag) == ("/bin/sh", "-c")
    match = re.fullmatch(r'exec mirror "\$@" --mirror="\$(\w+)"', script)
    assert match, f"postStart script {script!r}"
    return [*args, f"--mirror={env[match[1]]}"]


@pytest.mark.parametrize(
    ("runtime", "layer", "mirror_url"),
    [
        ("containerd", {}, "http://127.0.0.1:5000"),
        ("containerd", VALUE_SETS["host-ports"], "http://192.0.2.10:5000"),
        ("containerd", {"configure": {"extraArgs": ["--prepend-existing"]}}, None),
        ("containers", VALUE_SETS["cri-o"], "http://127.0.0.1:5000"),
    ],
)
def test_chart_runtime_arguments_parse(
    runtime: str, layer: dict[str, Any], mirror_url: str | None
) -> None:
    """The init container, postStart and preStop argument lists, as the kubelet runs them,
    through mirror's own parser."""
    values = {"mirror": {"mirroredRegistries": ["docker.io"], "upstreams": ["docker.io=https://m"]}}
    rendered = _render(values, layer)
    init = _container(rendered, f"configure-{runtime}")
    env = _node_env(init)
    configure = [_kubernetes_expand(arg, env) for arg in init["args"]]
    mirror = _container(rendered, "mirror")
    hook = _hook_argv(mirror["lifecycle"]["postStart"]["exec"]["command"], _node_env(mirror))
    # The hook configures exactly as the init container does.
    assert hook == configure
    assert configure[:2] == ["configure", runtime]
    if mirror_url:
        assert configure[-1] == f"--mirror={mirror_url}"
    args = _parse(configure)
    assert (args.command, args.runtime) == ("configure", runtime)
    cleanup = mirror["lifecycle"]["preStop"]["exec"]["command"]
    assert cleanup[:3] == ["mirror", "cleanup", runtime]
    cleaned = _parse(cleanup[1:])
    if runtime == "containerd":
        assert args.config_path == cleaned.config_path == Path("/etc/containerd/certs.d")
        assert args.resolve_tags is True
    else:
        directory = Path("/etc/containers/registries.conf.d")
        assert args.registries_dir == cleaned.registries_dir == directory
    assert "--mirrored-registries=docker.io" in configure
    assert "--upstream=docker.io=https://m" in configure


def _mirror_run_config(rendered: Rendered, tmp_path: Path) -> RunConfig:
    """The mirror container's RunConfig from its MIRROR_* environment on the sample node,
    with what Kubernetes gives the pod for the API."""
    environ = {
        name: value
        for name, value in _node_env(_container(rendered, "mirror")).items()
        if name.startswith("MIRROR_")
    }
    (tmp_path / "cluster.key").write_text(ClusterKey.generate())
    if "MIRROR_CLUSTER_KEY_FILE" in environ:
        environ["MIRROR_CLUSTER_KEY_FILE"] = str(tmp_path / "cluster.key")
    args = _parse(["run"], environ)
    (tmp_path / "token").write_text("token")
    (tmp_path / "ca.crt").write_bytes(_self_signed_certificate())
    pod = KubernetesEnv("10.96.0.1", "443", service_account_dir=tmp_path)
    args.orchestrator_env = OrchestratorEnv(kubernetes=pod)
    return run_config(args)


def test_chart_run_environment_parses(values: YamlFile, tmp_path: Path) -> None:
    rendered = _render()
    environ = _env(_container(rendered, "mirror"))
    assert environ["MIRROR_STORE"] == "containerd" and environ["MIRROR_CACHE_SIZE"] == "20%"
    config = _mirror_run_config(rendered, tmp_path)
    assert config.registry_addr.port == values.data["ports"]["registry"]
    assert config.routing.router_addr.port == values.data["ports"]["router"]
    assert config.metrics_addr.port == values.data["ports"]["metrics"]
    assert str(config.routing.advertise_ip) == "192.0.2.10"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_value_set_gives_a_run_config(name: str, tmp_path: Path) -> None:
    _mirror_run_config(_render(VALUE_SETS[name]), tmp_path)


def _self_signed_certificate() -> bytes:
    """A PEM CA certificate, standing in for the service account's ca.crt."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def test_chart_bootstrap_specs_parse(tmp_path: Path) -> None:
    """The --bootstrap entries the chart gives are ones mirror accepts, with the router port."""
    rendered = _render()
    assert _env(_container(rendered, "mirror"))["MIRROR_BOOTSTRAP"] == (
        "kubernetes:mirror-system/mirror:5001"
    )
    config = _mirror_run_config(rendered, tmp_path)
    assert [str(source) for source in config.routing.bootstrap] == [
        "kubernetes:mirror-system/mirror:5001"
    ]
    rendered = _render(VALUE_SETS["dns-bootstrap"])
    config = _mirror_run_config(rendered, tmp_path)
    assert [str(source) for source in config.routing.bootstrap] == [
        "dns:mirror.mirror-system.svc.cluster.local:5001",
        "static:10.0.0.5:5001",
    ]
    assert _pod(rendered)["automountServiceAccountToken"] is False  # no API access needed
    assert str(parse_bootstrap("dns:mirror.mirror-system.svc.cluster.local:5001", 5001)) == (
        "dns:mirror.mirror-system.svc.cluster.local:5001"
    )
    # No cluster: no key, no bootstrap.
    environ = _env(_container(_render(VALUE_SETS["standalone"]), "mirror"))
    assert "MIRROR_BOOTSTRAP" not in environ and "MIRROR_CLUSTER_KEY_FILE" not in environ


# --- the chart's prefetch values --------------------------------------------------------------
# What each `prefetch` value renders, read from helm's output: the prefetch file in its
# ConfigMap through mirror's own pin parser, the variables through `mirror run`'s parser.


# The defaults of values.yaml.
_PREFETCH_OFF: dict[str, Any] = {
    "images": [],
    "fromWorkloads": False,
    "namespace": "",
    "nodeLabels": {},
    "interval": "",
}


def _prefetch_env(prefetch: dict[str, Any]) -> dict[str, str]:
    """The variables these `prefetch` values add to the mirror container: name -> value, or
    `fieldRef:PATH` for one taken from the downward API."""
    base = _env(_container(_render(), "mirror"))
    env = _env(_container(_render({"prefetch": prefetch}), "mirror"))
    assert base.items() <= env.items()
    return {name: value for name, value in env.items() if name not in base}


def _prefetch_file(rendered: Rendered) -> str:
    (configmap,) = [
        doc for doc in rendered.all("ConfigMap") if doc["metadata"]["name"] == "mirror-prefetch"
    ]
    text: str = configmap["data"]["prefetch.toml"]
    return text


def test_chart_prefetch_defaults_render_nothing(values: YamlFile) -> None:
    assert values.data["prefetch"] == _PREFETCH_OFF
    assert _prefetch_env(_PREFETCH_OFF) == {}
    # Without images: no ConfigMap, no volume, no mount.
    rendered = _render()
    assert not rendered.has("ConfigMap") and not rendered.has("ClusterRole")
    assert "prefetch" not in {volume["name"] for volume in _pod(rendered)["volumes"]}
    assert "subPath" not in rendered.text


def test_chart_prefetch_file_gives_the_pins() -> None:
    text = _prefetch_file(_render({"prefetch": {"images": PREFETCH_IMAGES}}))
    document = tomllib.loads(text)
    assert [entry["ref"] for entry in document["image"]] == [i["ref"] for i in PREFETCH_IMAGES]
    pins = parse_pins(text, path="x")
    assert pins == (
        Pin(
            parse_image_ref("registry.internal:5000/infra/traefik:v2.10"),
            parse_image_ref("docker.io/library/traefik:v2.10"),
        ),
        Pin(
            parse_image_ref("registry.internal:5000/infra/registry:2.8"),
            None,
            {"role": "edge", "rack": "1", "gpu": "true", "node-role.kubernetes.io/edge": ""},
        ),
        Pin(parse_image_ref("busybox@sha256:" + "0" * 64), None, {"site": 'zürich-"<&>"\\🚀'}),
    )
    assert pins[1].applies_to(
        {"role": "edge", "rack": "1", "gpu": "true", "node-role.kubernetes.io/edge": "", "x": "y"}
    )
    assert not pins[1].applies_to({"role": "edge"})


@pytest.mark.parametrize(
    ("prefetch", "error"),
    [
        ({"images": [{"source": "docker.io/library/busybox:1"}]}, "prefetch.images[0] needs a ref"),
        ({"images": [{"ref": "busybox:1", "tag": "x"}]}, 'unknown key "tag"'),
        ({"images": ["busybox:1"]}, "prefetch.images[0] must be a map"),
        ({"images": [{"ref": "busybox:1", "nodes": {"role": None}}]}, "nodes.role has no value"),
        ({"images": [{"ref": "busybox:1", "nodes": ["role"]}]}, "nodes must be a map"),
        ({"nodeLabels": {"role": "a b"}}, "is not a KEY=VALUE label"),
    ],
)
def test_chart_refuses_prefetch_values_it_would_misrender(
    prefetch: dict[str, Any], error: str
) -> None:
    assert error in helm.render_error(chart_values({"prefetch": prefetch}))


def test_chart_prefetch_file_is_mounted_as_a_directory() -> None:
    rendered = _render({"prefetch": {"images": PREFETCH_IMAGES}})
    mounts = {mount["name"]: mount for mount in _container(rendered, "mirror")["volumeMounts"]}
    # The directory, not the file (no subPath): ConfigMap updates reach the pod.
    assert mounts["prefetch"] == {
        "name": "prefetch",
        "mountPath": "/etc/mirror/prefetch",
        "readOnly": True,
    }
    (volume,) = [v for v in _pod(rendered)["volumes"] if v["name"] == "prefetch"]
    assert volume["configMap"] == {"name": "mirror-prefetch"}
    assert _prefetch_env({**_PREFETCH_OFF, "images": PREFETCH_IMAGES}) == {
        "MIRROR_PREFETCH_FILE": "/etc/mirror/prefetch/prefetch.toml"
    }


@pytest.mark.parametrize(
    ("prefetch", "expected"),
    [
        ({"namespace": "apps"}, {}),  # only read with fromWorkloads
        (
            {"fromWorkloads": True},
            {"MIRROR_PREFETCH_FROM": "kubernetes", "MIRROR_NODE_NAME": "fieldRef:spec.nodeName"},
        ),
        (
            {"fromWorkloads": True, "namespace": "apps"},
            {
                "MIRROR_PREFETCH_FROM": "kubernetes",
                "MIRROR_NODE_NAME": "fieldRef:spec.nodeName",
                "MIRROR_KUBERNETES_NAMESPACE": "apps",
            },
        ),
        (
            {"nodeLabels": {"site": "paris", "role": "edge", "rack": 3}},
            {"MIRROR_NODE_LABEL": "rack=3 role=edge site=paris"},
        ),
        ({"interval": "2m"}, {"MIRROR_PREFETCH_INTERVAL": "2m"}),
    ],
)
def test_chart_prefetch_values_set_their_variables(
    prefetch: dict[str, Any], expected: dict[str, str]
) -> None:
    assert _prefetch_env({**_PREFETCH_OFF, **prefetch}) == expected


def test_chart_prefetch_environment_parses(tmp_path: Path) -> None:
    """Every prefetch value at once, through mirror's own parser."""
    rendered = _render(VALUE_SETS["prefetch"])
    prefetch = _mirror_run_config(rendered, tmp_path).prefetch
    assert prefetch.file == Path("/etc/mirror/prefetch/prefetch.toml")
    assert prefetch.workloads == (WorkloadSource.KUBERNETES,)
    assert prefetch.kubernetes_namespace == "apps"
    assert prefetch.node_labels == (("role", "edge"), ("site", "paris"))
    assert prefetch.recheck == 120
    assert prefetch.node_name == SAMPLE_NODE["spec.nodeName"]


def test_chart_prefetch_rbac() -> None:
    """fromWorkloads: the ServiceAccount token is mounted and may read the workloads and nodes."""
    standalone = {"cluster": {"enabled": False}}
    assert _pod(_render(standalone))["automountServiceAccountToken"] is False
    rendered = _render(standalone, {"prefetch": {"fromWorkloads": True}})
    assert _pod(rendered)["automountServiceAccountToken"] is True
    role = rendered.one("ClusterRole")
    # Cluster-scoped, so unique in the cluster: named after the release namespace too.
    assert role["metadata"]["name"] == "mirror-system-mirror-prefetch"
    assert role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments", "daemonsets", "statefulsets"],
            "verbs": ["get", "list", "watch"],
        },
        {"apiGroups": ["batch"], "resources": ["cronjobs"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
    ]
    binding = rendered.one("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "mirror-system-mirror-prefetch",
    }
    account = rendered.one("ServiceAccount")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    assert _pod(rendered)["serviceAccountName"] == account["name"]
    assert not _render(
        standalone, {"prefetch": {"fromWorkloads": True}, "rbac": {"create": False}}
    ).has("ClusterRole")


# --- the Nomad jobs ---------------------------------------------------------------------------

# Block and attribute names per block type, from Nomad's job specification
# (https://developer.hashicorp.com/nomad/docs/job-specification/<block>, and
# .../hcl2/variables, .../hcl2/locals, and HCL's dynamic blocks, .../hcl2/expressions) and the
# Docker task driver's `config` (https://developer.hashicorp.com/nomad/docs/drivers/docker).
# None: free-form keys. A dynamic block's `content` is checked as the block its label names.
JOB_SPEC: dict[str, set[str] | None] = {
    "<file>": {"variable", "variables", "locals", "job"},
    "variable": {"type", "default", "description", "validation"},
    "validation": {"condition", "error_message"},
    "variables": None,
    "locals": None,
    "job": {
        "all_at_once", "constraint", "affinity", "spread", "datacenters", "node_pool",
        "group", "meta", "migrate", "name", "namespace", "parameterized", "periodic",
        "priority", "region", "reschedule", "type", "update", "vault", "vault_token",
        "consul_token",
    },
    "group": {
        "constraint", "affinity", "spread", "count", "consul", "ephemeral_disk", "meta",
        "migrate", "network", "reschedule", "restart", "service", "shutdown_delay",
        "stop_after_client_disconnect", "max_client_disconnect", "disconnect", "task",
        "update", "vault", "volume", "scaling",
    },
    "task": {
        "artifact", "config", "constraint", "affinity", "dispatch_payload", "driver", "env",
        "identity", "kill_timeout", "kill_signal", "leader", "lifecycle", "logs", "meta",
        "resources", "restart", "service", "shutdown_delay", "user", "template", "vault",
        "volume_mount", "kind", "dynamic",
    },
    "dynamic": {"for_each", "iterator", "labels", "content"},
    "network": {"mode", "port", "dns", "hostname", "mbits"},
    "port": {"static", "to", "host_network"},
    "dns": {"servers", "searches", "options"},
    "service": {
        "provider", "cluster", "check", "connect", "identity", "name", "port", "tags",
        "canary_tags", "enable_tag_override", "address", "tagged_addresses", "address_mode",
        "task", "meta", "canary_meta", "on_update",
    },
    "check": {
        "address_mode", "args", "check_restart", "command", "grpc_service", "grpc_use_tls",
        "initial_status", "success_before_passing", "failures_before_critical",
        "failures_before_warning", "interval", "method", "body", "name", "path", "expose",
        "port", "protocol", "task", "timeout", "type", "tls_server_name", "tls_skip_verify",
        "on_update", "header",
    },
    "header": None,
    "check_restart": {"limit", "grace", "ignore_warnings"},
    "lifecycle": {"hook", "sidecar"},
    "identity": {"name", "aud", "env", "file", "filepath", "change_mode", "change_signal", "ttl"},
    "template": {
        "change_mode", "change_signal", "data", "destination", "env", "left_delimiter", "perms",
        "uid", "gid", "right_delimiter", "source", "splay", "wait", "vault_grace",
    },
    "wait": {"min", "max"},
    "env": None,
    "meta": None,
    "resources": {"cpu", "cores", "memory", "memory_max", "device"},
    "restart": {"attempts", "delay", "interval", "mode", "render_templates"},
    "update": {
        "max_parallel", "health_check", "min_healthy_time", "healthy_deadline",
        "progress_deadline", "auto_revert", "auto_promote", "canary", "stagger",
    },
    "volume": {
        "type", "source", "read_only", "per_alloc", "access_mode", "attachment_mode",
        "mount_options",
    },
    "volume_mount": {"volume", "destination", "read_only"},
    "constraint": {"attribute", "operator", "value"},
    # The Docker driver's task configuration.
    "config": {
        "image", "image_pull_timeout", "args", "auth", "auth_soft_fail", "command",
        "container_exists_attempts", "dns_search_domains", "dns_options", "dns_servers",
        "entrypoint", "extra_hosts", "force_pull", "group_add", "healthchecks", "hostname",
        "init", "interactive", "isolation", "sysctl", "ulimit", "privileged", "ipc_mode",
        "ipv4_address", "ipv6_address", "labels", "load", "logging", "mac_address",
        "memory_hard_limit", "network_aliases", "network_mode", "oom_score_adj", "pid_mode",
        "ports", "security_opt", "shm_size", "storage_opt", "tty", "uts_mode", "userns_mode",
        "volumes", "volume_driver", "work_dir", "mount", "devices", "cap_add", "cap_drop",
        "cpu_hard_limit", "cpu_cfs_period", "advertise_ipv6_address", "readonly_rootfs",
        "runtime", "pids_limit",
    },
    "mount": {"type", "target", "source", "readonly", "bind_options", "tmpfs_options",
              "volume_options"},
    "tmpfs_options": {"size", "mode"},
    "bind_options": {"propagation"},
}  # fmt: skip

_META = ("__is_block__", "__comments__", "__inline_comments__")


def _unquote(value: Any) -> Any:
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _bodies(item: Any, labels: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]] | None:
    """python-hcl2 8 writes a block as a dict marked __is_block__, each label as a wrapping key."""
    if not isinstance(item, dict):
        return None
    if item.get("__is_block__"):
        return [(labels, item)]
    found = []
    for key, value in item.items():
        if key in _META:
            continue
        inner = _bodies(value, (*labels, _unquote(key)))
        if inner is None:
            return None
        found.extend(inner)
    return found or None


def _blocks(value: Any) -> list[tuple[tuple[str, ...], dict]] | None:
    if not isinstance(value, list) or not value:
        return None
    found = []
    for item in value:
        bodies = _bodies(item)
        if bodies is None:
            return None
        found.extend(bodies)
    return found


def _walk(
    body: dict, kind: str, where: str, content: str = ""
) -> Iterator[tuple[str, str, str, Any]]:
    """(block kind, location, name, value) of every attribute and block under `body`.

    `content` is the label of the dynamic block `body` is: its `content` blocks are walked as
    blocks of that kind.
    """
    for name, value in body.items():
        if name in _META:
            continue
        blocks = _blocks(value)
        if blocks is None:
            yield kind, where, name, value
            continue
        yield kind, where, name, blocks
        for labels, inner in blocks:
            inner_kind = content if name == "content" and content else name
            inner_where = f"{where}/{name}" + "".join(f"[{x}]" for x in labels)
            dynamic = labels[0] if name == "dynamic" else ""
            yield from _walk(inner, inner_kind, inner_where, dynamic)


@pytest.fixture(scope="module")
def jobs() -> dict[str, dict]:
    try:
        import hcl2
    except ImportError:
        pytest.fail(
            "python-hcl2 is not installed: it is a test dependency of the Nomad job checks "
            "(pip install 'python-hcl2>=8,<9')",
            pytrace=False,
        )
    assert NOMAD_JOBS, "no nomad/*.nomad.hcl"
    parsed = {}
    for path in NOMAD_JOBS:
        with path.open() as handle:
            parsed[path.name] = hcl2.load(handle)
    return parsed


def test_nomad_jobs_use_only_job_specification_names(jobs: dict[str, dict]) -> None:
    wrong = []
    for name, job in jobs.items():
        for kind, where, key, _ in _walk(job, "<file>", name):
            allowed = JOB_SPEC.get(kind, set())
            if allowed is not None and key not in allowed:
                wrong.append(f"{where}: {key!r} is not part of {kind!r}")
    assert not wrong, "\n".join(wrong)


def _find(job: dict, kind: str) -> list[tuple[tuple[str, ...], dict]]:
    return [
        block
        for _, _, name, value in _walk(job, "<file>", "")
        if name == kind and isinstance(value, list)
        for block in value
    ]


def test_nomad_job_wiring(jobs: dict[str, dict]) -> None:
    job = jobs["mirror.nomad.hcl"]
    ((labels, spec),) = _find(job, "job")
    assert labels == ("mirror",) and _unquote(spec["type"]) == "system"
    ((_, network),) = _find(job, "network")
    assert _unquote(network["mode"]) == "host"
    ports = {labels[0]: body["static"] for labels, body in _find(job, "port")}
    assert ports == {"registry": 5000, "router": 5001, "metrics": 9090}
    ((_, service),) = _find(job, "service")
    assert _unquote(service["provider"]) == "nomad" and _unquote(service["name"]) == "mirror"
    checks = [body for _, body in _find(job, "check")]
    assert {_unquote(check["path"]) for check in checks} == {"/readyz", "/healthz"}
    assert all(_unquote(check["type"]) == "http" for check in checks)

    tasks = {labels[0]: body for labels, body in _find(job, "task")}
    prestart = tasks["configure-runtime"]
    assert _unquote(prestart["lifecycle"][0]["hook"]) == "prestart"
    assert _unquote(prestart["config"][0]["args"][0]) == "configure"
    mirror = tasks["mirror"]
    env = {key: _unquote(value) for key, value in mirror["env"][0].items() if key not in _META}
    assert env["MIRROR_ADVERTISE_ADDR"] == "${NOMAD_IP_registry}"
    assert env["MIRROR_BOOTSTRAP"].startswith("nomad:mirror")
    assert "nomadVar" in mirror["template"][0]["data"]
    assert mirror["identity"][0]["env"] is True
    # containerd's socket directory and content store, read-only (runtime_mounts in locals).
    mounts = job["locals"][0]["runtime_mounts"]
    assert "/run/containerd:/run/containerd:ro" in mounts
    assert "${var.containerd_content_path}:${var.containerd_content_path}:ro" in mounts
    assert all(_unquote(task["driver"]) == "docker" for task in tasks.values())

    cleanup = jobs["mirror-cleanup.nomad.hcl"]
    ((_, cleanup_spec),) = _find(cleanup, "job")
    assert _unquote(cleanup_spec["type"]) == "sysbatch"
    ((_, cleanup_task),) = _find(cleanup, "task")
    assert _unquote(cleanup_task["config"][0]["args"][0]) == "cleanup"


SAMPLE_NOMAD_RUNTIME = {
    "NOMAD_IP_registry": "192.0.2.10",
    "NOMAD_SECRETS_DIR": "/secrets",
    # The client's node pool and meta, as Nomad interpolates them into the task's env.
    "node.pool": "edge-pool",
    "meta.role": "edge",
    "meta.rack": "r7",
}


def _variables(job: dict, runtime: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The job's variables: their defaults, `runtime`, and `settings` as `-var` would give them."""
    variables = {
        labels[0]: _unquote(body.get("default")) for labels, body in _find(job, "variable")
    }
    unknown = set(settings) - set(variables)
    assert not unknown, f"the job has no variables {unknown}"
    return {**variables, **settings, "runtime": runtime}


def _runtime_interpolation(text: str) -> str:
    """What the client makes of the ${...} left in a value when the task starts."""
    return re.sub(r"\$\{([^}]+)\}", lambda match: SAMPLE_NOMAD_RUNTIME[match[1]], text)


def _interpolate(
    value: Any, job: dict, runtime: str, settings: Mapping[str, Any] | None = None
) -> str:
    """A value of the job as Nomad would hand it to the task, for one `runtime` and the
    variables in `settings` (the others at their defaults)."""
    variables = _variables(job, runtime, settings or {})
    local_exprs = {
        key: value for key, value in job.get("locals", [{}])[0].items() if key not in _META
    }
    ports = {f"NOMAD_PORT_{labels[0]}": str(body["static"]) for labels, body in _find(job, "port")}

    def expression(text: str) -> str:
        text = text.strip()
        conditional = re.fullmatch(r'var\.(\w+)(?: == "([^"]*)")? \? "([^"]*)" : "([^"]*)"', text)
        if conditional:
            name, equals, then, otherwise = conditional.groups()
            holds = variables[name] == equals if equals is not None else variables[name]
            return then if holds else otherwise
        # join(" ", [for KEY in var.LIST : "TEMPLATE"]): TEMPLATE for each item, where $${ is
        # a literal ${ that the client interpolates when the task starts.
        loop = re.fullmatch(r'join\(" ", \[for (\w+) in var\.(\w+) : "(.*)"\]\)', text)
        if loop:
            iterator, items, template = loop.groups()
            parts = []
            for item in variables[items]:
                hcl = template.replace("$${", "\0").replace(f"${{{iterator}}}", item)
                assert "${" not in hcl, f"cannot evaluate {template!r} in the Nomad job"
                parts.append(_runtime_interpolation(hcl.replace("\0", "${")))
            return " ".join(parts)
        if text.startswith("var."):
            return str(variables[text[4:]])
        if text.startswith("local."):
            return _interpolate(local_exprs[text[6:]], job, runtime, settings)
        known = {**ports, **SAMPLE_NOMAD_RUNTIME}
        if text in known:
            return known[text]
        raise AssertionError(f"cannot evaluate ${{{text}}} in the Nomad job")

    text = str(value)
    if text.startswith("${") and text.endswith("}"):
        return expression(text[2:-1])  # one expression (a string would be in quotes)
    text = re.sub(r"(?<!\$)\$\{([^}]+)\}", lambda match: expression(match[1]), _unquote(text))
    return _runtime_interpolation(text.replace("$${", "${"))


def _dynamic_blocks(
    body: dict, kind: str, job: dict, settings: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The `kind` blocks that the dynamic blocks in `body` make, `<kind>.value` filled in.

    for_each is read in the one form the jobs use: `var.X == "" ? [] : [ITEM]`.
    """
    variables = _variables(job, "docker", settings)
    made = []
    for labels, dynamic in _blocks(body.get("dynamic")) or []:
        if labels != (kind,):
            continue
        for_each = re.fullmatch(r'\$\{var\.(\w+) == "" \? \[\] : \[(.+)\]\}', dynamic["for_each"])
        assert for_each, f"cannot evaluate for_each = {dynamic['for_each']}"
        item = for_each[2]
        value = variables[item[4:]] if item.startswith("var.") else json.loads(item)
        (content,) = dynamic["content"]
        if variables[for_each[1]] != "":
            made.append(
                {
                    key: value if field == f"${{{kind}.value}}" else _unquote(field)
                    for key, field in content.items()
                    if key not in _META
                }
            )
    return made


def _mirror_task(job: dict) -> dict:
    ((_, task),) = [(labels, body) for labels, body in _find(job, "task") if labels == ("mirror",)]
    return task


def _mirror_task_environment(job: dict, settings: Mapping[str, Any]) -> dict[str, str]:
    """The mirror task's environment from the job: its env block and its env templates."""
    task = _mirror_task(job)
    env = {
        key: _interpolate(value, job, "docker", settings)
        for key, value in task["env"][0].items()
        if key not in _META
    }
    templates = [*task.get("template", []), *_dynamic_blocks(task, "template", job, settings)]
    for template in templates:
        if template.get("env") is True:
            for line in template["data"].splitlines():
                name, equals, value = line.partition("=")
                assert equals and name not in env, f"env template line {line!r}"
                env[name] = value
    return env


def _nomad_run_config(job: dict, settings: Mapping[str, Any], tmp_path: Path) -> RunConfig:
    """The mirror task's RunConfig from its MIRROR_* environment, as Nomad starts it."""
    env = _mirror_task_environment(job, settings)
    key_file = tmp_path / "cluster.key"
    key_file.write_text(ClusterKey.generate())
    assert env["MIRROR_CLUSTER_KEY_FILE"] == "/secrets/cluster.key"
    environ = {name: value for name, value in env.items() if name.startswith("MIRROR_")}
    environ["MIRROR_CLUSTER_KEY_FILE"] = str(key_file)
    # What Nomad gives the task besides MIRROR_*: the Task API and its workload identity, and
    # the client's datacenter (NOMAD_DC, set in every task).
    environ["NOMAD_ADDR"] = env["NOMAD_ADDR"]
    environ["NOMAD_TOKEN"] = "workload-identity"
    environ["NOMAD_DC"] = "dc1"
    return run_config(_parse(["run"], environ))


@pytest.mark.parametrize("runtime", ["docker", "containerd"])
def test_nomad_task_arguments_parse(jobs: dict[str, dict], runtime: str) -> None:
    """Every task's args, as Nomad interpolates them, through mirror's own parser."""
    seen = set()
    for job in jobs.values():
        for labels, task in _find(job, "task"):
            argv = [_interpolate(arg, job, runtime) for arg in task["config"][0]["args"]]
            args = _parse(argv)
            seen.add(argv[0])
            if argv[0] in ("configure", "cleanup"):
                assert args.runtime == runtime, labels
    assert seen == {"configure", "run", "cleanup"}


def test_nomad_run_environment_parses(jobs: dict[str, dict], tmp_path: Path) -> None:
    """The mirror task's MIRROR_* environment makes a valid RunConfig, bootstrap included."""
    config = _nomad_run_config(jobs["mirror.nomad.hcl"], {}, tmp_path)
    assert str(config.routing.advertise_ip) == "192.0.2.10"
    assert config.routing.router_addr.port == 5001
    assert [str(source) for source in config.routing.bootstrap] == ["nomad:mirror:5001"]


NOMAD_PREFETCH = {
    "prefetch_file": (
        "[[image]]\n"
        'ref = "registry.internal:5000/infra/traefik:v2.10"\n'
        'source = "docker.io/library/traefik:v2.10"\n'
        "\n"
        "[[image]]\n"
        'ref = "registry.internal:5000/infra/registry:2.8"\n'
        'nodes = { role = "edge", rack = "r7" }\n'
    ),
    "prefetch_from_jobs": True,
    "node_label_meta": ["role", "rack"],
}


def test_nomad_prefetch_is_off_by_default(jobs: dict[str, dict], tmp_path: Path) -> None:
    job = jobs["mirror.nomad.hcl"]
    defaults = _variables(job, "docker", {})
    assert defaults["prefetch_file"] == "" and defaults["prefetch_from_jobs"] is False
    assert defaults["node_label_meta"] == []
    # No prefetch file, so no template and no MIRROR_PREFETCH_FILE; the rest empty.
    assert _dynamic_blocks(_mirror_task(job), "template", job, {}) == []
    env = _mirror_task_environment(job, {})
    assert "MIRROR_PREFETCH_FILE" not in env
    assert env["MIRROR_PREFETCH_FROM"] == "" and env["MIRROR_NODE_LABEL"] == ""
    prefetch = _nomad_run_config(job, {}, tmp_path).prefetch
    assert prefetch.file is None and prefetch.workloads == () and prefetch.node_labels == ()


def test_nomad_prefetch_variables(jobs: dict[str, dict], tmp_path: Path) -> None:
    """prefetch_file, prefetch_from_jobs and node_label_meta, as the task gets them."""
    job = jobs["mirror.nomad.hcl"]
    assert "$${meta.${key}}" in job["locals"][0]["node_labels"], "meta is the client's"
    file, env_file = _dynamic_blocks(_mirror_task(job), "template", job, NOMAD_PREFETCH)
    # The file, as given, where the agent reads it: the Docker driver mounts local/ at /local.
    assert file == {
        "data": NOMAD_PREFETCH["prefetch_file"],
        "destination": "local/prefetch.toml",
        "change_mode": "noop",
    }
    assert env_file["env"] is True and env_file["change_mode"] == "noop"
    env = _mirror_task_environment(job, NOMAD_PREFETCH)
    assert env["MIRROR_PREFETCH_FILE"] == "/" + file["destination"]
    assert env["MIRROR_PREFETCH_FROM"] == "nomad"
    assert env["MIRROR_NOMAD_NODE_POOL"] == "edge-pool"
    assert env["MIRROR_NODE_LABEL"] == "role=edge rack=r7"
    prefetch = _nomad_run_config(job, NOMAD_PREFETCH, tmp_path).prefetch
    assert prefetch.file == Path("/local/prefetch.toml")
    assert prefetch.workloads == (WorkloadSource.NOMAD,)
    assert (prefetch.nomad_datacenter, prefetch.nomad_node_pool) == ("dc1", "edge-pool")
    assert prefetch.node_labels == (("role", "edge"), ("rack", "r7"))
    pins = parse_pins(file["data"], path="x")
    assert [str(pin.ref) for pin in pins] == [
        "registry.internal:5000/infra/traefik:v2.10",
        "registry.internal:5000/infra/registry:2.8",
    ]
    assert all(pin.applies_to(dict(prefetch.node_labels)) for pin in pins)


def test_nomad_env_vars_are_run_flags(jobs: dict[str, dict]) -> None:
    names = set()
    for job in jobs.values():
        for kind, _, key, _ in _walk(job, "<file>", ""):
            if kind == "env" and key.startswith("MIRROR_"):
                names.add(key)
    # ... and those of env templates, with every variable that adds one set.
    names |= set(_mirror_task_environment(jobs["mirror.nomad.hcl"], NOMAD_PREFETCH))
    names = {name for name in names if name.startswith("MIRROR_")}
    assert {"MIRROR_ADVERTISE_ADDR", "MIRROR_PREFETCH_FILE"} <= names
    unknown = names - _run_env_names()
    assert not unknown, f"the Nomad job sets variables that are no `mirror run` flag: {unknown}"


# --- the image --------------------------------------------------------------------------------


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert re.search(r"python:3\.11-slim", text)
    assert "-r requirements.lock" in text and "COPY requirements.lock" in text
    assert re.search(r"install --no-deps /wheels/mirror-\*\.whl", text)
    users = [line.split(None, 1)[1] for line in instructions if line.startswith("USER ")]
    assert users, "the image must not run as root by default"
    assert users[-1].split(":")[0] not in ("0", "root")
    assert not re.search(r"apt-get install|build-essential|\bgcc\b", text), "no build tools"
    assert re.search(r'ENTRYPOINT \["mirror"\]', text)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored and "!requirements.lock" in ignored and "!mirror/" in ignored


def test_image_check_script_is_valid_bash() -> None:
    """scripts/check-image builds and runs the image for real (root, network, minutes): it is
    a release check run by hand, recorded in the README. Here: it parses and documents itself."""
    script = ROOT / "scripts" / "check-image"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    shown = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "Usage: scripts/check-image" in shown
