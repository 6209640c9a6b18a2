"""The Helm chart proven by the real tools.

For each value set of ``harness.helm.VALUE_SETS`` (defaults with an image; ServiceMonitor and
dashboard; existing Secrets; host ports instead of the host network; the docker store;
prefetch; the PrometheusRule and NetworkPolicy; CRI-O; dns bootstrap; a standalone node):
``helm lint --strict`` passes, ``helm template`` renders the resources meant, and every rendered
manifest passes ``kubernetes-validate --strict`` against Kubernetes 1.33's schemas. The custom
resources (ServiceMonitor, PrometheusRule) have no schema there: that warning is accepted for
them alone, and their content is checked here instead (alerts on documented metrics).

helm is the binary bin/setup-env installs into .tools/bin; without it these tests fail with
the command to run, never skip.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from harness import helm
from harness.helm import CUSTOM_RESOURCES, NAMESPACE, VALUE_SETS, Rendered, chart_values

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    try:
        helm.helm_binary()
        helm.kubernetes_validate_binary()
    except helm.ToolMissing as missing:
        pytest.fail(str(missing), pytrace=False)


def _render(*layers: dict[str, Any]) -> Rendered:
    return helm.render(chart_values(*layers))


_BASE = ["DaemonSet", "Role", "RoleBinding", "Secret", "Service", "ServiceAccount"]

EXPECTED_KINDS = {
    "defaults": _BASE,
    "monitoring": [*_BASE, "ConfigMap", "ServiceMonitor"],
    "existing-secrets": [kind for kind in _BASE if kind != "Secret"],
    "host-ports": _BASE,
    "docker-store": _BASE,
    "prefetch": [*_BASE, "ClusterRole", "ClusterRoleBinding", "ConfigMap"],
    "alerts-and-policy": [*_BASE, "NetworkPolicy", "PrometheusRule", "ServiceMonitor"],
    "cri-o": _BASE,
    "dns-bootstrap": ["DaemonSet", "Secret", "Service", "ServiceAccount"],
    "standalone": ["DaemonSet", "Service"],
}


def test_every_value_set_has_its_expected_resources() -> None:
    assert set(EXPECTED_KINDS) == set(VALUE_SETS)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_chart_lints_strictly(name: str) -> None:
    helm.lint(chart_values(VALUE_SETS[name]))


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_manifests_are_valid_kubernetes(name: str) -> None:
    rendered = _render(VALUE_SETS[name])
    assert Counter(rendered.kinds()) == Counter(EXPECTED_KINDS[name])
    for document in rendered.documents:
        if document["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert document["metadata"]["namespace"] == NAMESPACE, document["kind"]
    validation = helm.validate(rendered)
    # Only the custom resources went unchecked, each with kubernetes-validate's warning.
    custom = [
        (doc["apiVersion"], doc["kind"])
        for doc in rendered.documents
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_RESOURCES
    ]
    assert sorted(validation.unchecked) == sorted(custom)


def test_validation_catches_a_bad_manifest() -> None:
    """The validation step is not a formality: an unknown field fails it (--strict)."""
    rendered = _render()
    service = rendered.text.replace("  clusterIP: None\n", "  clusterIP: None\n  bogus: 1\n")
    assert service != rendered.text
    with pytest.raises(helm.ChartError, match="bogus"):
        helm.validate(Rendered(service, rendered.documents))


def test_the_image_is_required() -> None:
    assert "image.repository is required" in helm.render_error({})


def test_image_digest_wins_over_the_tag() -> None:
    daemonset = _render(VALUE_SETS["dns-bootstrap"]).one("DaemonSet")
    images = {c["image"] for c in _pod(daemonset)["containers"] + _pod(daemonset)["initContainers"]}
    assert images == {f"{helm.IMAGE_REPOSITORY}@sha256:" + "a" * 64}
    daemonset = _render().one("DaemonSet")
    assert _container(daemonset, "mirror")["image"] == f"{helm.IMAGE_REPOSITORY}:0.1.0"


# --- the pod ----------------------------------------------------------------------------------


def _pod(daemonset: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = daemonset["spec"]["template"]["spec"]
    return spec


def _container(daemonset: dict[str, Any], name: str) -> dict[str, Any]:
    pod = _pod(daemonset)
    (found,) = [c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name]
    return found


def _volumes(daemonset: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {volume["name"]: volume for volume in _pod(daemonset)["volumes"]}


def _mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {mount["name"]: mount for mount in container.get("volumeMounts", [])}


def _ports(objects: list[dict[str, Any]], port: str = "port") -> set[tuple[int, str]]:
    return {(entry[port], entry["protocol"]) for entry in objects}


def test_host_network_and_host_ports() -> None:
    daemonset = _render().one("DaemonSet")
    pod = _pod(daemonset)
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert all("hostPort" not in port for port in _container(daemonset, "mirror")["ports"])
    daemonset = _render(VALUE_SETS["host-ports"]).one("DaemonSet")
    pod = _pod(daemonset)
    assert pod["hostNetwork"] is False and pod["dnsPolicy"] == "ClusterFirst"
    ports = {port["name"]: port for port in _container(daemonset, "mirror")["ports"]}
    assert (ports["registry"]["hostPort"], ports["registry"]["protocol"]) == (5000, "TCP")
    assert (ports["router"]["hostPort"], ports["router"]["protocol"]) == (5001, "UDP")
    assert "hostPort" not in ports["metrics"]


# --- configure.runtime: containerd or containers (CRI-O) --------------------------------------


def test_containerd_runtime_is_the_default() -> None:
    daemonset = _render().one("DaemonSet")
    init = _container(daemonset, "configure-containerd")
    assert init["args"][:2] == ["configure", "containerd"]
    assert "--config-path=/etc/containerd/certs.d" in init["args"]
    assert _mounts(init)["containerd-certs"]["mountPath"] == "/etc/containerd/certs.d"
    volumes = _volumes(daemonset)
    assert volumes["containerd-certs"]["hostPath"] == {
        "path": "/etc/containerd/certs.d",
        "type": "DirectoryOrCreate",
    }
    assert "containers-registries" not in volumes
    mirror = _container(daemonset, "mirror")
    assert mirror["lifecycle"]["preStop"]["exec"]["command"][:3] == [
        "mirror",
        "cleanup",
        "containerd",
    ]


def test_containers_runtime_writes_a_registries_drop_in() -> None:
    """CRI-O: `mirror configure containers` into the host's registries.conf.d, with the
    mirror, registries, upstreams and tag setting the containerd step gets; `cleanup
    containers` on stop. registries.conf beside the directory is readable, not writable."""
    values = {
        "configure": {"runtime": "containers", "resolveTags": False},
        "mirror": {
            "store": "cache",
            "mirroredRegistries": ["docker.io", "quay.io"],
            "upstreams": ["docker.io=https://registry-mirror.internal"],
        },
    }
    daemonset = _render(values).one("DaemonSet")
    init = _container(daemonset, "configure-containers")
    assert init["args"] == [
        "configure",
        "containers",
        "--registries-dir=/etc/containers/registries.conf.d",
        "--resolve-tags=false",
        "--mirrored-registries=docker.io",
        "--mirrored-registries=quay.io",
        "--upstream=docker.io=https://registry-mirror.internal",
        "--mirror=$(RUNTIME_MIRROR_URL)",
    ]
    mounts = [
        {"name": "containers-config", "mountPath": "/etc/containers", "readOnly": True},
        {"name": "containers-registries", "mountPath": "/etc/containers/registries.conf.d"},
    ]
    assert init["volumeMounts"] == mounts
    volumes = _volumes(daemonset)
    for name, path in (
        ("containers-config", "/etc/containers"),
        ("containers-registries", "/etc/containers/registries.conf.d"),
    ):
        assert volumes[name]["hostPath"] == {"path": path, "type": "DirectoryOrCreate"}
    # A CRI-O node has no containerd: with the cache store nothing of containerd is mounted.
    assert not {"containerd-certs", "containerd-run", "containerd-content"} & set(volumes)
    mirror = _container(daemonset, "mirror")
    assert [m for m in mirror["volumeMounts"] if m["name"].startswith("containers-")] == mounts
    assert mirror["lifecycle"]["preStop"]["exec"]["command"] == [
        "mirror",
        "cleanup",
        "containers",
        "--registries-dir=/etc/containers/registries.conf.d",
    ]
    post_start = mirror["lifecycle"]["postStart"]["exec"]["command"]
    assert post_start[4:6] == ["configure", "containers"]
    assert post_start[6:] == init["args"][2:-1]


def test_an_unknown_runtime_is_refused() -> None:
    error = helm.render_error(chart_values({"configure": {"runtime": "cri-o"}}))
    assert 'configure.runtime must be containerd or containers, not "cri-o"' in error


# --- PrometheusRule ---------------------------------------------------------------------------


def _documented_metrics() -> dict[str, set[str]]:
    """docs/metrics.md (generated from mirror/metrics.py): metric name -> its labels."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    rows = re.findall(r"^\| `(mirror_[a-z_]+)` \| \w+ \| ([^|]*) \|", text, re.M)
    return {name: set(re.findall(r"`(\w+)`", labels)) for name, labels in rows}


_SELECTOR = re.compile(r"\b([a-z_:][a-z0-9_:]*)\{([^}]*)\}")


def _rules() -> tuple[Rendered, list[dict[str, Any]]]:
    rendered = _render(VALUE_SETS["alerts-and-policy"])
    (group,) = rendered.one("PrometheusRule")["spec"]["groups"]
    return rendered, group["rules"]


def test_prometheus_rule_alerts_on_documented_metrics() -> None:
    rendered, rules = _rules()
    documented = _documented_metrics()
    assert documented, "docs/metrics.md has no metrics table"
    chart_rules = [rule for rule in rules if rule["alert"] != "MirrorNoPeers"]
    used: set[str] = set()
    for rule in chart_rules:
        names = set(re.findall(r"\bmirror_[a-z_]+", rule["expr"]))
        unknown = names - set(documented)
        assert not unknown, f"{rule['alert']} queries metrics not in docs/metrics.md: {unknown}"
        used |= names
        # Every label matched is one the metric has (besides the scrape's job and namespace).
        for metric, matchers in _SELECTOR.findall(rule["expr"]):
            labels = set(re.findall(r"(\w+)\s*=", matchers)) - {"job", "namespace"}
            assert labels <= documented.get(metric, set()), (rule["alert"], metric, labels)
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # What the alerts are for: node down, upstream errors, corrupt blobs from peers, a full cache.
    assert {
        "mirror_store_up",
        "mirror_upstream_fetches_total",
        "mirror_peer_fetch_failures_total",
        "mirror_corrupt_blobs_total",
        "mirror_cache_passthrough_total",
    } <= used
    alerts = {rule["alert"]: rule for rule in chart_rules}
    assert 'reason="digest-mismatch"' in alerts["MirrorPeerDigestMismatch"]["expr"]
    assert 'result="error"' in alerts["MirrorUpstreamErrors"]["expr"]
    # `up` of this release's scrape: the Prometheus Operator names the job after the Service
    # the ServiceMonitor selects.
    service = rendered.one("Service")["metadata"]["name"]
    match = f'job="{service}", namespace="{NAMESPACE}"'
    assert alerts["MirrorAgentDown"]["expr"] == f"up{{{match}}} == 0"
    monitor = rendered.one("ServiceMonitor")["spec"]
    assert (
        monitor["selector"]["matchLabels"].items()
        <= rendered.one("Service")["metadata"]["labels"].items()
    )
    # ... and every series an alert reads is one of this release's agents.
    for rule in chart_rules:
        selectors = [matchers for _, matchers in _SELECTOR.findall(rule["expr"])]
        assert selectors and all(match in matchers for matchers in selectors), rule["alert"]


def test_prometheus_rule_values() -> None:
    rendered, rules = _rules()
    rule = rendered.one("PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rules[-1] == VALUE_SETS["alerts-and-policy"]["prometheusRule"]["extraRules"][0]
    # Prometheus' own template syntax reaches Prometheus, not helm.
    assert "{{ $labels.instance }}" in rules[0]["annotations"]["summary"]
    assert not _render().has("PrometheusRule")


# --- NetworkPolicy ----------------------------------------------------------------------------


def test_network_policy_opens_the_agent_ports() -> None:
    rendered = _render(VALUE_SETS["alerts-and-policy"])
    policy = rendered.one("NetworkPolicy")["spec"]
    daemonset = rendered.one("DaemonSet")
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    agent, metrics = policy["ingress"]
    container_ports = _ports(_container(daemonset, "mirror")["ports"], "containerPort")
    assert _ports(agent["ports"]) == {(5000, "TCP"), (5001, "UDP")} < container_ports
    assert agent["from"] == [
        {"namespaceSelector": {}},
        {"ipBlock": {"cidr": "10.0.0.0/16"}},
        {"ipBlock": {"cidr": "fd00::/64"}},
    ]
    assert _ports(metrics["ports"]) == {(9090, "TCP")} < container_ports
    assert metrics["from"] == [
        {
            "namespaceSelector": {},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    assert not _render().has("NetworkPolicy")


def test_network_policy_with_no_peers_allows_every_source() -> None:
    values = {"networkPolicy": {"enabled": True, "from": [], "metricsFrom": []}}
    policy = _render(values).one("NetworkPolicy")["spec"]
    assert all("from" not in rule for rule in policy["ingress"])
    values = {"ports": {"registry": 5500, "router": 5501, "metrics": 9500}}
    policy = _render(values, {"networkPolicy": {"enabled": True}}).one("NetworkPolicy")["spec"]
    assert [_ports(rule["ports"]) for rule in policy["ingress"]] == [
        {(5500, "TCP"), (5501, "UDP")},
        {(9500, "TCP")},
    ]
