"""Deployment files: the Helm chart, the Nomad jobs and the Dockerfile agree with the program.

No helm, nomad or docker runs here. These tests check what can be checked statically: the chart's
values exist and are documented, the Nomad jobs parse as HCL and use only job-specification
names, every ``MIRROR_*`` variable they set is a real flag of ``mirror run``, the argument lists
and environments they give mirror pass its own parser (``build_parser``, ``run_config``,
``parse_bootstrap``), the prefetch file the chart and the Nomad job write is one mirror reads
with the pins meant, the dashboard only queries metrics the program exports, and the
Dockerfile installs the pinned dependencies and drops root.

values.yaml and Chart.yaml are read with the small YAML-subset reader below (PyYAML is not a
dependency); it refuses anything outside the subset instead of misreading it. The Nomad jobs are
read with python-hcl2, which must be installed (a test dependency, like pytest).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import re
import secrets
import string
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

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


# --- a YAML subset ---------------------------------------------------------------------------

_UNSUPPORTED = re.compile(r"^(?:[&*!|>%@`]|---|\.\.\.)")


class YamlSubsetError(ValueError):
    pass


def _strip_comment(text: str) -> str:
    quote = None
    for index, char in enumerate(text):
        if quote:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1] in " \t"):
            return text[:index].rstrip()
    return text.rstrip()


def _split_flow(text: str) -> list[str]:
    if any(bracket in text for bracket in "[]{}"):
        raise YamlSubsetError(f"nested flow collection: {text!r}")
    return [item.strip() for item in text.split(",") if item.strip()]


def _scalar(text: str, where: str) -> Any:
    if _UNSUPPORTED.match(text):
        raise YamlSubsetError(f"{where}: unsupported YAML {text!r}")
    if text.startswith('"'):
        if not text.endswith('"') or len(text) < 2:
            raise YamlSubsetError(f"{where}: unterminated string {text!r}")
        return json.loads(text)
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise YamlSubsetError(f"{where}: unterminated string {text!r}")
        return text[1:-1].replace("''", "'")
    if text.startswith("["):
        if not text.endswith("]"):
            raise YamlSubsetError(f"{where}: unterminated list {text!r}")
        return [_scalar(item, where) for item in _split_flow(text[1:-1])]
    if text.startswith("{"):
        if not text.endswith("}"):
            raise YamlSubsetError(f"{where}: unterminated mapping {text!r}")
        pairs = (item.split(": ", 1) for item in _split_flow(text[1:-1]))
        return {key.strip(): _scalar(value.strip(), where) for key, value in pairs}
    if text in ("null", "~", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    if re.fullmatch(r"[-+]?[0-9]+", text):
        return int(text)
    if re.fullmatch(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?", text):
        return float(text)
    if text in ("yes", "no", "on", "off", "Yes", "No", "On", "Off"):
        raise YamlSubsetError(f"{where}: ambiguous scalar {text!r}: quote it")
    return text


class YamlDocument:
    """Block mappings and sequences, flow [] and {} of scalars, quoted and plain scalars.

    ``key_lines`` maps every mapping key's path to its line number and ``comment_lines`` holds
    the numbers of full-line comments, so a test can ask whether a key is documented.
    """

    def __init__(self, text: str, name: str) -> None:
        self.name = name
        self.key_lines: dict[tuple[Any, ...], int] = {}
        self.comment_lines: set[int] = set()
        self._lines: list[tuple[int, str, int]] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                raise YamlSubsetError(f"{name}:{number}: tab in indentation")
            stripped = raw.strip()
            if not stripped:
                continue
            if stripped.startswith("#"):
                self.comment_lines.add(number)
                continue
            content = _strip_comment(stripped)
            self._lines.append((len(raw) - len(raw.lstrip(" ")), content, number))
        self._pos = 0
        self.data = self._block(self._lines[0][0], ()) if self._lines else None
        if self._pos != len(self._lines):
            _, content, number = self._lines[self._pos]
            raise YamlSubsetError(f"{name}:{number}: unexpected {content!r}")

    def _where(self, number: int) -> str:
        return f"{self.name}:{number}"

    def _block(self, indent: int, path: tuple[Any, ...]) -> Any:
        _, content, _ = self._lines[self._pos]
        if content == "-" or content.startswith("- "):
            return self._sequence(indent, path)
        return self._mapping(indent, path)

    def _mapping(self, indent: int, path: tuple[Any, ...]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while self._pos < len(self._lines):
            line_indent, content, number = self._lines[self._pos]
            if line_indent < indent:
                break
            if line_indent > indent or content.startswith("- ") or content == "-":
                raise YamlSubsetError(f"{self._where(number)}: bad indentation")
            match = re.fullmatch(r'("(?:[^"\\]|\\.)*"|[^\s"\'#][^:]*?)\s*:(?:\s+(.*))?', content)
            if match is None:
                raise YamlSubsetError(f"{self._where(number)}: not a 'key: value' line")
            key = match.group(1)
            key = json.loads(key) if key.startswith('"') else key
            if key in result:
                raise YamlSubsetError(f"{self._where(number)}: duplicate key {key!r}")
            self.key_lines[(*path, key)] = number
            self._pos += 1
            rest = match.group(2)
            if rest:
                result[key] = _scalar(rest, self._where(number))
                continue
            following = self._lines[self._pos] if self._pos < len(self._lines) else None
            if following and following[0] > indent:
                result[key] = self._block(following[0], (*path, key))
            elif following and following[0] == indent and following[1].startswith("- "):
                result[key] = self._sequence(indent, (*path, key))
            else:
                result[key] = None
        return result

    def _sequence(self, indent: int, path: tuple[Any, ...]) -> list[Any]:
        result: list[Any] = []
        while self._pos < len(self._lines):
            line_indent, content, number = self._lines[self._pos]
            if line_indent != indent or not (content == "-" or content.startswith("- ")):
                if line_indent > indent:
                    raise YamlSubsetError(f"{self._where(number)}: bad indentation")
                break
            item = content[1:].strip()
            item_path = (*path, len(result))
            if not item:
                self._pos += 1
                result.append(self._block(self._lines[self._pos][0], item_path))
            elif re.match(r'("[^"]*"|[^\s"\'\[{][^:]*?)\s*:(\s|$)', item):
                # "- key: value" starts a mapping indented past the dash.
                self._lines[self._pos] = (indent + 2, item, number)
                result.append(self._mapping(indent + 2, item_path))
            else:
                self._pos += 1
                result.append(_scalar(item, self._where(number)))
        return result


def load_yaml(path: Path) -> YamlDocument:
    return YamlDocument(path.read_text(), str(path.relative_to(ROOT)))


def test_yaml_subset_reader() -> None:
    doc = YamlDocument(
        "# comment\n"
        "a: 1\n"
        "b:\n"
        '  c: "x # y"  # trailing\n'
        "  d: [p, 'q''s']\n"
        "  e: {}\n"
        "list:\n"
        "  - operator: Exists\n"
        "    effect: NoSchedule\n"
        "  - plain\n"
        "same:\n"
        "- 2.5\n"
        "empty:\n",
        "inline",
    )
    assert doc.data == {
        "a": 1,
        "b": {"c": "x # y", "d": ["p", "q's"], "e": {}},
        "list": [{"operator": "Exists", "effect": "NoSchedule"}, "plain"],
        "same": [2.5],
        "empty": None,
    }
    assert doc.key_lines[("b", "c")] == 4 and doc.comment_lines == {1}
    for bad in ("a: &anchor 1\n", "a: |\n  text\n", "a: yes\n", "a:\n  - [x, [y]]\n"):
        with pytest.raises(YamlSubsetError):
            YamlDocument(bad, "bad")


# --- the Helm chart ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def values() -> YamlDocument:
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


def test_every_value_used_in_templates_exists(values: YamlDocument) -> None:
    missing = []
    for path in sorted(_values_references()):
        node: Any = values.data
        for key in path:
            if not isinstance(node, dict) or key not in node:
                missing.append(".".join(path))
                break
            node = node[key]
    assert not missing, f"templates use values that values.yaml does not define: {missing}"


def test_every_value_is_documented_and_used(values: YamlDocument) -> None:
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


def test_chart_defaults(values: YamlDocument) -> None:
    data = values.data
    assert data["network"]["hostNetwork"] is True
    assert data["tolerations"] == [{"operator": "Exists"}], "every taint is tolerated"
    assert data["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert data["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert data["readinessProbe"]["httpGet"]["port"] == "registry"
    assert data["serviceMonitor"]["enabled"] is False and data["dashboard"]["enabled"] is False
    assert data["cluster"]["bootstrap"]["mode"] == "kubernetes"
    assert "maxSurge" not in data["updateStrategy"].get("rollingUpdate", {})


def test_daemonset_wiring() -> None:
    daemonset = (TEMPLATES / "daemonset.yaml").read_text()
    helpers = (TEMPLATES / "_helpers.tpl").read_text()
    # The advertised address is the node's, from the downward API.
    assert re.search(
        r"name: MIRROR_ADVERTISE_ADDR\n\s+valueFrom:\n\s+fieldRef:\n\s+fieldPath: status.hostIP",
        daemonset,
    )
    assert "hostNetwork: {{ $hostNetwork }}" in daemonset
    assert re.search(r"- configure\n\s+- containerd\n", daemonset)
    assert re.search(r"preStop:\n\s+exec:\n\s+command:\n\s+- mirror\n\s+- cleanup\n", daemonset)
    assert 'include "mirror.configureHook"' in daemonset
    # containerd is mounted read-only; the hosts.toml directory is the one written.
    assert re.search(r"name: containerd-run\n\s+mountPath: .*\n\s+readOnly: true", daemonset)
    assert re.search(r"name: containerd-content\n\s+mountPath: .*\n\s+readOnly: true", daemonset)
    assert '"--config-path=%s" .Values.containerd.certsDir' in helpers
    assert 'printf "kubernetes:%s/%s:%d"' in helpers and 'printf "dns:%s.%s.svc.%s:%d"' in helpers
    rbac = (TEMPLATES / "rbac.yaml").read_text()
    assert 'apiGroups: ["discovery.k8s.io"]' in rbac
    assert 'resources: ["endpointslices"]' in rbac
    assert 'verbs: ["get", "list", "watch"]' in rbac
    service = (TEMPLATES / "service.yaml").read_text()
    assert "clusterIP: None" in service and "protocol: UDP" in service


def test_cluster_key_secret_is_generated_once_in_a_form_the_program_reads() -> None:
    secret = (TEMPLATES / "secret.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in secret
    assert "randAlphaNum 32 | b64enc | b64enc" in secret  # key text, then Secret data encoding
    # randAlphaNum 32 | b64enc, as sprig computes it: the key text the mounted file holds.
    alphabet = string.ascii_letters + string.digits
    for _ in range(50):
        raw = "".join(secrets.choice(alphabet) for _ in range(32))
        text = base64.b64encode(raw.encode()).decode()
        ClusterKey.from_text(text)  # raises ConfigError if not accepted
        assert len(base64.urlsafe_b64decode(text)) == 32


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


# --- mirror's own flags -----------------------------------------------------------------------


def _run_env_names() -> set[str]:
    """MIRROR_<FLAG> of every `mirror run` flag, as mirror.cli names them."""
    return {doc.env for doc in flag_reference()["run"]}


def test_chart_env_vars_are_run_flags() -> None:
    names = set()
    for text in _template_texts().values():
        names |= set(re.findall(r"\bname: (MIRROR_[A-Z0-9_]+)", text))
    assert {"MIRROR_ADVERTISE_ADDR", "MIRROR_BOOTSTRAP", "MIRROR_CLUSTER_KEY_FILE"} <= names
    unknown = names - _run_env_names()
    assert not unknown, f"the chart sets variables that are no `mirror run` flag: {unknown}"


# Values the argument checks put where the chart and the jobs put a value of their own.
SAMPLE_ARGUMENTS = {
    "--config-path": "/etc/containerd/certs.d",
    "--daemon-json": "/etc/docker/daemon.json",
    "--mirror": "http://127.0.0.1:5000",
    "--mirrored-registries": "docker.io",
    "--upstream": "docker.io=https://registry-1.docker.io",
    "--resolve-tags": "true",
}


def _parse(argv: list[str], environ: dict[str, str] | None = None) -> argparse.Namespace:
    try:
        return build_parser(environ or {}).parse_args(argv)
    except SystemExit:
        pytest.fail(f"mirror rejects {argv}: see its error above", pytrace=False)


def _helper(name: str) -> str:
    helpers = (TEMPLATES / "_helpers.tpl").read_text()
    body = helpers.split('{{- define "' + name + '" -}}', 1)[1]
    return body.split("{{- define ", 1)[0].split("{{/*", 1)[0]


def _helper_flags(name: str) -> list[str]:
    return re.findall(r'printf "(--[a-z-]+)=%[st]"', _helper(name))


def test_chart_runtime_arguments_parse() -> None:
    """The init container, postStart and preStop argument lists, through mirror's own parser."""
    configure = [
        f"{flag}={SAMPLE_ARGUMENTS[flag]}" for flag in _helper_flags("mirror.configureArgs")
    ]
    cleanup = [f"{flag}={SAMPLE_ARGUMENTS[flag]}" for flag in _helper_flags("mirror.cleanupArgs")]
    daemonset = (TEMPLATES / "daemonset.yaml").read_text()
    # The init container and the postStart hook add the mirror URL; preStop needs none.
    assert '"--mirror=$(CONTAINERD_MIRROR_URL)"' in daemonset
    assert '--mirror="$CONTAINERD_MIRROR_URL"' in _helper("mirror.configureHook")
    assert "--mirror" not in _helper("mirror.cleanupArgs")
    assert re.search(r"- mirror\n\s+- cleanup\n\s+- containerd\n", daemonset)
    mirror = f"--mirror={SAMPLE_ARGUMENTS['--mirror']}"
    args = _parse(["configure", "containerd", *configure, mirror, "--prepend-existing"])
    assert args.config_path == Path("/etc/containerd/certs.d")
    args = _parse(["cleanup", "containerd", *cleanup])
    assert args.config_path == Path("/etc/containerd/certs.d")


def _lookup(values: YamlDocument, dotted: str) -> Any:
    node = values.data
    for key in dotted.split("."):
        node = node[key]
    return node


def _chart_run_environment(values: YamlDocument) -> dict[str, str]:
    """MIRROR_* the DaemonSet always sets, with the default values filled in."""
    daemonset = (TEMPLATES / "daemonset.yaml").read_text()
    environ = {}
    for name, value in re.findall(r"- name: (MIRROR_[A-Z_]+)\n\s+value: (.+)", daemonset):
        plain = re.fullmatch(r"\{\{ \.Values\.([\w.]+) \| quote \}\}", value)
        formatted = re.fullmatch(
            r'\{\{ printf "([^"]*)" \(int \.Values\.([\w.]+)\) \| quote \}\}', value
        )
        if plain:
            node = _lookup(values, plain.group(1))
            environ[name] = str(node).lower() if isinstance(node, bool) else str(node)
        elif formatted:
            environ[name] = formatted.group(1).replace("%d", str(_lookup(values, formatted[2])))
        elif "{{" not in value:
            environ[name] = value
    return environ


def test_chart_run_environment_parses(values: YamlDocument) -> None:
    environ = _chart_run_environment(values)
    assert environ["MIRROR_STORE"] == "containerd" and environ["MIRROR_CACHE_SIZE"] == "20%"
    config = run_config(_parse(["run"], environ))
    assert config.registry_addr.port == values.data["ports"]["registry"]
    assert config.routing.router_addr.port == values.data["ports"]["router"]
    assert config.metrics_addr.port == values.data["ports"]["metrics"]


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
    """The --bootstrap entries the chart builds are ones mirror accepts, with the router port."""
    formats = dict(re.findall(r'printf "((kubernetes|dns):[^"]+)"', _helper("mirror.bootstrap")))
    formats = {kind: text for text, kind in formats.items()}
    kubernetes = formats["kubernetes"] % ("mirror-system", "mirror", 5001)
    dns = formats["dns"] % ("mirror", "mirror-system", "cluster.local", 5001)
    (tmp_path / "token").write_text("token")
    (tmp_path / "ca.crt").write_bytes(_self_signed_certificate())
    pod = KubernetesEnv("10.96.0.1", "443", service_account_dir=tmp_path)
    source = parse_bootstrap(kubernetes, 5001, env=OrchestratorEnv(kubernetes=pod))
    assert str(source) == "kubernetes:mirror-system/mirror:5001"
    assert str(parse_bootstrap(dns, 5001)) == "dns:mirror.mirror-system.svc.cluster.local:5001"


# --- the chart's prefetch values --------------------------------------------------------------
# What each `prefetch` value renders, read from the templates as they spell it (no helm runs
# here): the helpers are read line by line in the few forms they use, and anything else fails
# the test instead of being misread.


def _helper_body(name: str) -> str:
    """A helper's body without the `{{- end }}` that closes its define."""
    body = _helper(name).strip()
    assert body.endswith("{{- end }}"), name
    return body.removesuffix("{{- end }}").strip()


def _go_string(value: Any) -> str:
    """A YAML scalar as sprig's toString gives it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int):
        return str(value)
    raise AssertionError(f"no sample value of type {type(value).__name__} here")


def _go_json(text: str) -> str:
    """A string as sprig's toJson writes it: Go's encoding/json keeps UTF-8 as it is (no
    surrogate pairs, which TOML refuses) and escapes <, >, & and U+2028/9 as \\u00XX."""
    encoded = json.dumps(text, ensure_ascii=False)
    for char in "<>&\u2028\u2029":
        encoded = encoded.replace(char, f"\\u{ord(char):04x}")
    return encoded


def _prefetch_toml(images: list[dict[str, Any]]) -> str:
    """The prefetch file the chart renders from `prefetch.images`, its lines as the helper
    spells them."""
    lines = _helper_body("mirror.prefetchToml").splitlines()
    for spelled in (
        "{{- range $index, $image := .Values.prefetch.images }}",
        "[[image]]",
        'ref = {{ required (printf "prefetch.images[%d] needs a ref" $index) $image.ref'
        " | toString | toJson }}",
        "{{- with $image.source }}",
        "source = {{ toString . | toJson }}",
        "{{- with $image.nodes }}",
        "{{- range $label, $value := . }}",
        '{{- $pairs = append $pairs (printf "%s = %s" (toJson $label) (toString $value'
        " | toJson)) }}",
        'nodes = { {{ join ", " $pairs }} }',
    ):
        assert spelled in lines, f"mirror.prefetchToml no longer has {spelled!r}"
    configmap = (TEMPLATES / "prefetch-configmap.yaml").read_text()
    assert configmap.startswith("{{- if .Values.prefetch.images }}")
    assert re.search(
        r"\n  prefetch\.toml: \|\n"
        r'    \{\{- include "mirror\.prefetchToml" \. \| trim \| nindent 4 \}\}',
        configmap,
    )
    rendered = []
    for image in images:
        rendered += ["[[image]]", f"ref = {_go_json(_go_string(image['ref']))}"]
        if image.get("source"):
            rendered.append(f"source = {_go_json(_go_string(image['source']))}")
        if image.get("nodes"):
            pairs = [
                f"{_go_json(label)} = {_go_json(_go_string(value))}"
                for label, value in sorted(image["nodes"].items())
            ]
            rendered.append("nodes = { " + ", ".join(pairs) + " }")
    return "\n".join(rendered) + "\n"


def _prefetch_file_path() -> str:
    assert (
        _helper_body("mirror.prefetchFile") == '{{ include "mirror.prefetchDir" . }}/prefetch.toml'
    )
    return _helper_body("mirror.prefetchDir") + "/prefetch.toml"


def _node_labels(labels: dict[str, Any]) -> str:
    body = _helper_body("mirror.nodeLabels")
    assert "{{- range $key, $value := .Values.prefetch.nodeLabels }}" in body
    assert '(printf "%s=%s" $key (toString $value))' in body and '{{- join " " $labels }}' in body
    return " ".join(f"{key}={_go_string(value)}" for key, value in sorted(labels.items()))


def _prefetch_env(prefetch: dict[str, Any]) -> dict[str, str]:
    """The variables `mirror.prefetchEnv` renders for these `prefetch` values: name -> value,
    or `fieldRef:PATH` for one taken from the downward API."""
    env: dict[str, str] = {}
    scopes: list[tuple[bool, Any]] = []  # (it holds, what `.` is inside it)
    name = ""
    for line in _helper_body("mirror.prefetchEnv").splitlines():
        text = line.strip()
        block = re.fullmatch(r"\{\{- (?:if|with) \.Values\.prefetch\.(\w+) \}\}", text)
        if block:
            scopes.append((bool(prefetch[block[1]]), prefetch[block[1]]))
        elif text == "{{- end }}":
            scopes.pop()
        elif text.startswith("#") or not all(holds for holds, _ in scopes):
            continue
        elif match := re.fullmatch(r"- name: (MIRROR_[A-Z_]+)", text):
            name = match[1]
        elif match := re.fullmatch(r"fieldPath: (\S+)", text):
            env[name] = f"fieldRef:{match[1]}"
        elif match := re.fullmatch(r"value: (.+)", text):
            value = match[1]
            if value == "{{ . | quote }}":
                env[name] = _go_string(scopes[-1][1])
            elif value == '{{ include "mirror.prefetchFile" . | quote }}':
                env[name] = _prefetch_file_path()
            elif value == '{{ include "mirror.nodeLabels" $ | quote }}':
                env[name] = _node_labels(prefetch["nodeLabels"])
            elif value.startswith('"') and "{{" not in value:
                env[name] = json.loads(value)
            else:
                raise AssertionError(f"mirror.prefetchEnv: cannot read {text!r}")
        elif text not in ("valueFrom:", "fieldRef:"):
            raise AssertionError(f"mirror.prefetchEnv: cannot read {text!r}")
    assert not scopes, "mirror.prefetchEnv: unbalanced if/with/end"
    return env


# The defaults of values.yaml.
_PREFETCH_OFF: dict[str, Any] = {
    "images": [],
    "fromWorkloads": False,
    "namespace": "",
    "nodeLabels": {},
    "interval": "",
}

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


def test_chart_prefetch_defaults_render_nothing(values: YamlDocument) -> None:
    assert values.data["prefetch"] == _PREFETCH_OFF
    assert _prefetch_env(_PREFETCH_OFF) == {}
    # Without images: no ConfigMap, no volume, no mount (all behind the same test).
    configmap = (TEMPLATES / "prefetch-configmap.yaml").read_text()
    assert configmap.startswith("{{- if .Values.prefetch.images }}\n")
    daemonset = (TEMPLATES / "daemonset.yaml").read_text()
    assert daemonset.count("{{- if .Values.prefetch.images }}") == 2
    assert "subPath:" not in daemonset


def test_chart_prefetch_file_gives_the_pins() -> None:
    text = _prefetch_toml(PREFETCH_IMAGES)
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


def test_chart_prefetch_file_is_mounted_as_a_directory() -> None:
    daemonset = (TEMPLATES / "daemonset.yaml").read_text()
    assert re.search(
        r'- name: prefetch\n\s+mountPath: \{\{ include "mirror\.prefetchDir" \. \}\}\n'
        r"\s+readOnly: true",
        daemonset,
    )
    assert re.search(
        r"- name: prefetch\n\s+configMap:\n"
        r'\s+name: \{\{ include "mirror\.prefetchConfigMap" \. \}\}',
        daemonset,
    )
    configmap = (TEMPLATES / "prefetch-configmap.yaml").read_text()
    assert 'name: {{ include "mirror.prefetchConfigMap" . }}' in configmap
    assert _prefetch_env({**_PREFETCH_OFF, "images": PREFETCH_IMAGES}) == {
        "MIRROR_PREFETCH_FILE": "/etc/mirror/prefetch/prefetch.toml"
    }


@pytest.mark.parametrize(
    ("values", "expected"),
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
    values: dict[str, Any], expected: dict[str, str]
) -> None:
    assert _prefetch_env({**_PREFETCH_OFF, **values}) == expected


def test_chart_prefetch_environment_parses(tmp_path: Path) -> None:
    """Every prefetch value at once, through mirror's own parser."""
    env = _prefetch_env(
        {
            "images": PREFETCH_IMAGES,
            "fromWorkloads": True,
            "namespace": "apps",
            "nodeLabels": {"site": "paris", "role": "edge"},
            "interval": "2m",
        }
    )
    daemonset = (TEMPLATES / "daemonset.yaml").read_text()
    assert '{{- with include "mirror.prefetchEnv" . | trim }}' in daemonset
    environ = {key: value for key, value in env.items() if not value.startswith("fieldRef:")}
    environ["MIRROR_NODE_NAME"] = "node-1"
    args = _parse(["run"], environ)
    # What Kubernetes gives the pod for the API, its address and service account, where
    # `mirror run`'s parser keeps it.
    (tmp_path / "token").write_text("token")
    (tmp_path / "ca.crt").write_bytes(_self_signed_certificate())
    pod = KubernetesEnv("10.96.0.1", "443", service_account_dir=tmp_path)
    args.orchestrator_env = OrchestratorEnv(kubernetes=pod)
    prefetch = run_config(args).prefetch
    assert prefetch.file == Path("/etc/mirror/prefetch/prefetch.toml")
    assert prefetch.workloads == (WorkloadSource.KUBERNETES,)
    assert prefetch.kubernetes_namespace == "apps"
    assert prefetch.node_labels == (("role", "edge"), ("site", "paris"))
    assert prefetch.recheck == 120
    assert prefetch.node_name == "node-1"


def test_chart_prefetch_rbac() -> None:
    """fromWorkloads: the ServiceAccount token is mounted and may read the workloads and nodes."""
    daemonset = (TEMPLATES / "daemonset.yaml").read_text()
    assert (
        "{{- $kubernetesApi := or $kubernetesBootstrap .Values.prefetch.fromWorkloads }}"
        in daemonset
    )
    assert "automountServiceAccountToken: {{ $kubernetesApi }}" in daemonset
    rbac = (TEMPLATES / "rbac.yaml").read_text()
    section = rbac.split("{{- if and .Values.rbac.create .Values.prefetch.fromWorkloads }}\n")[1]
    role, binding = section.split("{{- end }}")[0].split("---\n")[1:]
    name = '  name: {{ include "mirror.prefetchClusterRole" . }}\n'
    assert "\nkind: ClusterRole\nmetadata:\n" + name in role
    rules = YamlDocument("rules:" + role.split("\nrules:", 1)[1], "rbac.yaml").data["rules"]
    assert rules == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments", "daemonsets", "statefulsets"],
            "verbs": ["get", "list", "watch"],
        },
        {"apiGroups": ["batch"], "resources": ["cronjobs"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
    ]
    assert re.search(
        r"roleRef:\n  apiGroup: rbac\.authorization\.k8s\.io\n  kind: ClusterRole\n"
        + re.escape(name)
        + r"subjects:\n  - kind: ServiceAccount\n"
        r'    name: \{\{ include "mirror\.serviceAccountName" \. \}\}\n'
        r"    namespace: \{\{ \.Release\.Namespace \}\}\n",
        binding,
    )
    # Cluster-scoped, so unique in the cluster: named after the release namespace too.
    assert '.Release.Namespace (include "mirror.fullname" .)' in _helper(
        "mirror.prefetchClusterRole"
    )


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
