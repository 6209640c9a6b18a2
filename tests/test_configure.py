"""`mirror configure` / `mirror cleanup`: the files written, idempotency, exact restoration."""

from __future__ import annotations

import json
import os
import shutil
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from mirror.cli import main
from mirror.errors import ConfigError
from mirror.runtime import (
    containerd_hosts,
    containers_registries,
    docker_certs,
    docker_daemon,
    files,
    tomlwrite,
)
from mirror.runtime.containerd_hosts import ContainerdHostsConfig
from mirror.runtime.containers_registries import ContainersRegistriesConfig
from mirror.runtime.docker_certs import CertsMode, DaemonStore, DockerConfig
from mirror.runtime.endpoints import parse_mirror_url

MIRROR = "http://127.0.0.1:5000"
HEADER = (
    "# Written by `mirror configure containerd`; `mirror cleanup containerd` restores the "
    "original.\n\n"
)
# An operator's file, written the way people do: comments, odd spacing, a header sub-table.
OPERATOR_HOSTS = b"""# managed by hand
server = "https://registry.example"   # the real one
ca = "/etc/certs/registry.pem"

[host."https://cache.example"]
capabilities = [ "pull" ]
skip_verify = true
  [host."https://cache.example".header]
  x-team = ["a", "b"]

[host."http://127.0.0.1:5000/"]
capabilities = ["pull"]
"""


Snapshot = dict[str, tuple[str, bytes | None, int]]


def snapshot(root: Path) -> Snapshot:
    """Every path under `root` with its kind, bytes and mode: what 'as it was' means."""
    found: Snapshot = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
        kind = "dir" if stat.S_ISDIR(info.st_mode) else "file"
        found[str(path.relative_to(root))] = (kind, content, stat.S_IMODE(info.st_mode))
    return found


def hosts_config(config_path: Path, **overrides: object) -> ContainerdHostsConfig:
    settings: dict[str, object] = {
        "config_path": config_path,
        "mirrors": (MIRROR,),
        "registries": ("docker.io",),
    }
    settings.update(overrides)
    return ContainerdHostsConfig(**settings)  # type: ignore[arg-type]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**base, **(env or {})},
        check=False,
    )


# --- containerd: what is written ---------------------------------------------------------


def test_hosts_toml_puts_the_mirrors_first_and_upstream_as_server(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    config = hosts_config(certs, mirrors=(MIRROR, "http://10.0.0.7:5000"))
    containerd_hosts.configure(config)
    text = (certs / "docker.io" / "hosts.toml").read_text()
    assert text == HEADER + (
        'server = "https://registry-1.docker.io"\n'
        "\n"
        '[host."http://127.0.0.1:5000"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        '  dial_timeout = "1s"\n'
        "\n"
        '[host."http://10.0.0.7:5000"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        '  dial_timeout = "1s"\n'
    )
    assert sorted(p.name for p in (certs / "docker.io").iterdir()) == [
        "hosts.toml",
        "hosts.toml.mirror-absent",
    ]


def test_resolve_tags_false_gives_the_mirror_pull_only(tmp_path: Path) -> None:
    containerd_hosts.configure(hosts_config(tmp_path, resolve_tags=False))
    document = tomllib.loads((tmp_path / "docker.io" / "hosts.toml").read_text())
    assert document["host"][MIRROR]["capabilities"] == ["pull"]


def test_upstream_override_is_the_server(tmp_path: Path) -> None:
    config = hosts_config(
        tmp_path,
        registries=("docker.io", "ghcr.io"),
        upstream=(("docker.io", "http://10.1.1.1:5000"),),
    )
    containerd_hosts.configure(config)
    servers = {
        name: tomllib.loads((tmp_path / name / "hosts.toml").read_text())["server"]
        for name in ("docker.io", "ghcr.io")
    }
    assert servers == {"docker.io": "http://10.1.1.1:5000", "ghcr.io": "https://ghcr.io"}


def test_all_registries_use_default_and_each_registry_already_configured(tmp_path: Path) -> None:
    (tmp_path / "quay.io").mkdir()
    (tmp_path / "quay.io" / "hosts.toml").write_text('server = "https://quay.io"\n')
    (tmp_path / "not a registry").mkdir()
    config = hosts_config(tmp_path, registries=None, upstream=(("r.local:5000", "http://r:1"),))
    containerd_hosts.configure(config)
    written = {p.parent.name for p in tmp_path.glob("*/hosts.toml")}
    assert written == {"_default", "quay.io", "r.local:5000"}
    default = tomllib.loads((tmp_path / "_default" / "hosts.toml").read_text())
    assert "server" not in default  # containerd then uses the registry itself
    assert list(default["host"]) == [MIRROR]
    upstream = tomllib.loads((tmp_path / "r.local:5000" / "hosts.toml").read_text())
    assert upstream["server"] == "http://r:1"


def test_port_directory_form_is_used_when_it_exists(tmp_path: Path) -> None:
    """containerd looks at `host_port_` before `host:port`: writing the other would be moot."""
    (tmp_path / "reg.local_5000_").mkdir()
    containerd_hosts.configure(hosts_config(tmp_path, registries=("reg.local:5000",)))
    assert (tmp_path / "reg.local_5000_" / "hosts.toml").is_file()
    assert not (tmp_path / "reg.local:5000").exists()


def test_certificate_files_are_carried_into_the_new_file(tmp_path: Path) -> None:
    """Without hosts.toml containerd reads *.crt/*.cert/*.key; with one, only the file."""
    directory = tmp_path / "registry.example"
    directory.mkdir()
    for name in ("ca.crt", "me.cert", "me.key", "other.cert"):
        (directory / name).write_text(name)
    containerd_hosts.configure(hosts_config(tmp_path, registries=("registry.example",)))
    document = tomllib.loads((directory / "hosts.toml").read_text())
    assert document["ca"] == ["ca.crt"]
    assert document["client"] == [["me.cert", "me.key"], ["other.cert", ""]]
    containerd_hosts.cleanup(tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == [
        "ca.crt",
        "me.cert",
        "me.key",
        "other.cert",
    ]


def test_prepend_existing_keeps_its_hosts_after_ours_and_its_server(tmp_path: Path) -> None:
    directory = tmp_path / "registry.example"
    directory.mkdir()
    (directory / "hosts.toml").write_bytes(OPERATOR_HOSTS)
    config = hosts_config(tmp_path, registries=("registry.example",), prepend_existing=True)
    containerd_hosts.configure(config)
    document = tomllib.loads((directory / "hosts.toml").read_text())
    assert document["server"] == "https://registry.example"
    assert document["ca"] == "/etc/certs/registry.pem"
    # Ours first; the operator's copy of our URL (trailing slash) is not listed twice.
    assert list(document["host"]) == [MIRROR, "https://cache.example"]
    assert document["host"]["https://cache.example"] == {
        "capabilities": ["pull"],
        "skip_verify": True,
        "header": {"x-team": ["a", "b"]},
    }


def test_without_prepend_an_existing_file_is_replaced(tmp_path: Path) -> None:
    directory = tmp_path / "registry.example"
    directory.mkdir()
    (directory / "hosts.toml").write_bytes(OPERATOR_HOSTS)
    containerd_hosts.configure(hosts_config(tmp_path, registries=("registry.example",)))
    document = tomllib.loads((directory / "hosts.toml").read_text())
    assert document == {
        "server": "https://registry.example",
        "host": {MIRROR: {"capabilities": ["pull", "resolve"], "dial_timeout": "1s"}},
    }


# --- containerd: idempotency and restoration ---------------------------------------------


@pytest.mark.parametrize("prepend", [False, True])
def test_configure_twice_gives_the_same_bytes_and_keeps_the_first_backup(
    tmp_path: Path, prepend: bool
) -> None:
    directory = tmp_path / "docker.io"
    directory.mkdir()
    (directory / "hosts.toml").write_bytes(OPERATOR_HOSTS)
    config = hosts_config(tmp_path, prepend_existing=prepend)
    containerd_hosts.configure(config)
    first = snapshot(tmp_path)
    containerd_hosts.configure(config)
    assert snapshot(tmp_path) == first
    # Even after someone edits our file, configure starts again from the original.
    (directory / "hosts.toml").write_text("edited\n")
    containerd_hosts.configure(config)
    assert snapshot(tmp_path) == first
    assert (directory / "hosts.toml.mirror-backup").read_bytes() == OPERATOR_HOSTS


def test_round_trip_without_existing_files_leaves_nothing(tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    certs = tmp_path / "etc" / "containerd" / "certs.d"
    config = hosts_config(certs, registries=("docker.io", "ghcr.io"))
    containerd_hosts.configure(config)
    containerd_hosts.configure(config)
    messages = containerd_hosts.cleanup(certs)
    assert snapshot(tmp_path) == before
    assert f"removed {tmp_path / 'etc'}" in messages


def test_round_trip_with_existing_files_is_byte_identical(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    (certs / "docker.io").mkdir(parents=True)
    (certs / "docker.io" / "hosts.toml").write_bytes(OPERATOR_HOSTS)
    os.chmod(certs / "docker.io" / "hosts.toml", 0o600)
    (certs / "ghcr.io").mkdir()  # an empty directory of the operator's: it must stay
    (certs / "unrelated.txt").write_text("keep me")
    before = snapshot(certs)
    for prepend in (True, False, True):
        containerd_hosts.configure(
            hosts_config(certs, registries=None, mirrors=(MIRROR,), prepend_existing=prepend)
        )
    assert (certs / "ghcr.io" / "hosts.toml").exists()
    containerd_hosts.cleanup(certs)
    assert snapshot(certs) == before
    assert containerd_hosts.cleanup(certs) == [
        f"nothing to restore: mirror wrote no hosts.toml under {certs}"
    ]


def test_registries_dropped_from_the_flags_are_restored(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    containerd_hosts.configure(hosts_config(certs, registries=("a.example", "b.example")))
    containerd_hosts.configure(hosts_config(certs, registries=("b.example",)))
    assert sorted(p.name for p in certs.iterdir()) == ["b.example"]
    containerd_hosts.cleanup(certs)
    assert not certs.exists()  # mirror made it; the record survived a.example's restoration


def test_upstream_registries_dropped_in_all_mode_are_restored(tmp_path: Path) -> None:
    upstream = (("r.example", "http://10.0.0.9:5000"),)
    containerd_hosts.configure(hosts_config(tmp_path, registries=None, upstream=upstream))
    containerd_hosts.configure(hosts_config(tmp_path, registries=None))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_default"]


def test_malformed_hosts_toml_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    (tmp_path / "quay.io").mkdir()
    (tmp_path / "quay.io" / "hosts.toml").write_text('server = "https://quay.io"\n[host."x"\n')
    before = snapshot(tmp_path)
    config = hosts_config(tmp_path, registries=("docker.io", "quay.io"))
    with pytest.raises(ConfigError, match=r"quay.io/hosts.toml is not valid TOML"):
        containerd_hosts.configure(config)
    assert snapshot(tmp_path) == before


def test_hosts_that_are_not_tables_are_refused_when_prepending(tmp_path: Path) -> None:
    (tmp_path / "docker.io").mkdir()
    (tmp_path / "docker.io" / "hosts.toml").write_text('host = "https://elsewhere"\n')
    with pytest.raises(ConfigError, match=r'"host" must hold \[host."URL"\] tables'):
        containerd_hosts.configure(hosts_config(tmp_path, prepend_existing=True))


def test_a_symlinked_hosts_toml_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real.toml").write_text('server = "https://docker.io"\n')
    (tmp_path / "docker.io").mkdir()
    (tmp_path / "docker.io" / "hosts.toml").symlink_to(tmp_path / "real.toml")
    with pytest.raises(ConfigError, match="symbolic link"):
        containerd_hosts.configure(hosts_config(tmp_path))


# --- docker --------------------------------------------------------------------------------


DAEMON_JSON = b"""{
    "debug": true,
    "registry-mirrors": ["https://mirror.gcr.io", "http://127.0.0.1:5000/"],
    "log-opts": {"max-size": "10m"},
    "labels": ["caf\xc3\xa9"]
}"""


def test_docker_mirrors_go_first_and_every_other_key_stays(tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    path.write_bytes(DAEMON_JSON)
    messages = docker_daemon.configure(path, (MIRROR, "http://127.0.0.2:5000"))
    settings = json.loads(path.read_bytes())
    assert list(settings) == ["debug", "registry-mirrors", "log-opts", "labels"]
    assert settings["registry-mirrors"] == [
        MIRROR,
        "http://127.0.0.2:5000",
        "https://mirror.gcr.io",
    ]
    assert settings["log-opts"] == {"max-size": "10m"} and settings["labels"] == ["café"]
    assert any("SIGHUP" in line for line in messages)
    assert (tmp_path / "daemon.json.mirror-backup").read_bytes() == DAEMON_JSON


def test_docker_configure_is_idempotent_and_cleanup_byte_identical(tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    path.write_bytes(DAEMON_JSON)
    os.chmod(path, 0o600)
    before = snapshot(tmp_path)
    docker_daemon.configure(path, (MIRROR,))
    written = snapshot(tmp_path)
    docker_daemon.configure(path, (MIRROR,))
    assert snapshot(tmp_path) == written
    # The original sets registry-mirrors, so a SIGHUP puts dockerd back on them.
    assert docker_daemon.cleanup(path)[-1] == docker_daemon.RELOAD_HINT
    assert snapshot(tmp_path) == before


def test_docker_without_a_file_writes_one_and_cleanup_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "docker" / "daemon.json"
    docker_daemon.configure(path, (MIRROR,))
    assert path.read_text() == '{\n  "registry-mirrors": [\n    "http://127.0.0.1:5000"\n  ]\n}\n'
    # dockerd's SIGHUP keeps its mirrors when the file sets none: only a restart drops ours.
    assert docker_daemon.cleanup(path)[-1] == docker_daemon.RESTART_HINT
    assert list(tmp_path.iterdir()) == []
    assert docker_daemon.cleanup(path) == [f"nothing to restore: mirror never wrote {path}"]


def test_docker_empty_file_counts_as_no_settings(tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    path.write_bytes(b"\n")
    docker_daemon.configure(path, (MIRROR,))
    assert json.loads(path.read_bytes()) == {"registry-mirrors": [MIRROR]}
    docker_daemon.cleanup(path)
    assert path.read_bytes() == b"\n"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"debug": tru', "is not valid JSON"),
        (b'["a"]', "must hold a JSON object"),
        (b'{"registry-mirrors": "http://x"}', '"registry-mirrors" must be a list of URLs'),
        (b'{"registry-mirrors": [1]}', '"registry-mirrors" must be a list of URLs'),
    ],
)
def test_docker_malformed_file_is_refused_untouched(
    tmp_path: Path, content: bytes, needle: str
) -> None:
    path = tmp_path / "daemon.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=needle):
        docker_daemon.configure(path, (MIRROR,))
    assert [p.name for p in tmp_path.iterdir()] == ["daemon.json"]
    assert path.read_bytes() == content


# --- command line --------------------------------------------------------------------------


def test_cli_round_trip_with_environment_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = tmp_path / "certs.d"
    environ = {
        "MIRROR_CONFIG_PATH": str(certs),
        "MIRROR_MIRROR": "http://127.0.0.1:5000 http://127.0.0.2:5000",
        "MIRROR_MIRRORED_REGISTRIES": "docker.io ghcr.io",
        "MIRROR_UPSTREAM": "ghcr.io=http://10.0.0.1:5000",
        "MIRROR_RESOLVE_TAGS": "false",
    }
    assert main(["configure", "containerd"], environ) == 0
    assert "wrote " in capsys.readouterr().out
    document = tomllib.loads((certs / "ghcr.io" / "hosts.toml").read_text())
    assert document["server"] == "http://10.0.0.1:5000"
    assert list(document["host"]) == ["http://127.0.0.1:5000", "http://127.0.0.2:5000"]
    assert document["host"]["http://127.0.0.1:5000"]["capabilities"] == ["pull"]
    # A flag on the command line wins over the environment.
    assert main(["configure", "containerd", "--mirror", "http://127.0.0.3:5000"], environ) == 0
    document = tomllib.loads((certs / "docker.io" / "hosts.toml").read_text())
    assert list(document["host"]) == ["http://127.0.0.3:5000"]
    assert main(["cleanup", "containerd"], {"MIRROR_CONFIG_PATH": str(certs)}) == 0
    assert not certs.exists()


def test_cli_prepend_existing_is_a_switch_or_a_boolean(tmp_path: Path) -> None:
    (tmp_path / "docker.io").mkdir()
    (tmp_path / "docker.io" / "hosts.toml").write_bytes(OPERATOR_HOSTS)
    base = [
        "configure",
        "containerd",
        f"--config-path={tmp_path}",
        "--mirrored-registries=docker.io",
    ]

    def hosts() -> list[str]:
        return list(tomllib.loads((tmp_path / "docker.io" / "hosts.toml").read_text())["host"])

    assert main([*base, "--prepend-existing"], {}) == 0
    assert hosts() == [MIRROR, "https://cache.example"]
    assert main([*base, "--prepend-existing=false"], {}) == 0
    assert hosts() == [MIRROR]
    assert main(base, {"MIRROR_PREPEND_EXISTING": "true"}) == 0
    assert hosts() == [MIRROR, "https://cache.example"]


def test_cli_docker_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    path.write_bytes(DAEMON_JSON)
    env = {
        "MIRROR_DAEMON_JSON": str(path),
        "MIRROR_CERTS_DIR": str(tmp_path / "certs.d"),
        "DOCKER_HOST": f"unix://{tmp_path / 'no-daemon.sock'}",
    }
    result = run_cli("configure", "docker", env=env)
    assert result.returncode == 0, result.stderr
    assert "SIGHUP" in result.stdout
    assert "left" in result.stdout and not (tmp_path / "certs.d").exists()
    assert json.loads(path.read_bytes())["registry-mirrors"][0] == MIRROR
    result = run_cli("cleanup", "docker", f"--daemon-json={path}")
    assert result.returncode == 0, result.stderr
    assert path.read_bytes() == DAEMON_JSON


@pytest.mark.parametrize(
    ("args", "setup", "status", "needle"),
    [
        (["configure", "containerd", "--mirror=ftp://x"], None, 2, "invalid mirror URL 'ftp://x'"),
        (["configure", "docker", "--mirror=http://x/v2"], None, 2, "must have no path"),
        (["configure", "containerd", "--upstream=nope"], None, 2, "is not REGISTRY=URL"),
        (["configure", "containerd", "--resolve-tags=maybe"], None, 2, "invalid boolean"),
        (["configure", "containerd", "--mirrored-registries=-x"], None, 2, "invalid registry"),
        (["configure"], None, 2, "the following arguments are required: runtime"),
        (["configure", "podman"], None, 2, "invalid choice: 'podman'"),
        (["configure", "containerd"], ("hosts", b"[host\n"), 1, "is not valid TOML"),
        (["configure", "docker"], ("json", b"{oops"), 1, "is not valid JSON"),
        (["configure", "docker"], ("json", b"3"), 1, "must hold a JSON object"),
        (["configure", "docker"], ("json", b'{"registry-mirrors": {}}'), 1, "must be a list"),
        (["configure", "docker", "--certs-d=maybe"], None, 2, "expected auto, yes or no"),
        (["configure", "docker", "--certs-d=yes"], ("json", b"{oops"), 1, "is not valid JSON"),
        (["configure", "docker", "--certs-d=yes"], ("docker", b"[host\n"), 1, "not valid TOML"),
    ],
)
def test_cli_errors_are_one_line(
    tmp_path: Path, args: list[str], setup: tuple[str, bytes] | None, status: int, needle: str
) -> None:
    certs, daemon_json = tmp_path / "certs.d", tmp_path / "daemon.json"
    docker_certs_d = tmp_path / "docker-certs.d"
    if setup is not None and setup[0] in ("hosts", "docker"):
        directory = certs if setup[0] == "hosts" else docker_certs_d
        (directory / "docker.io").mkdir(parents=True)
        (directory / "docker.io" / "hosts.toml").write_bytes(setup[1])
    if setup is not None and setup[0] == "json":
        daemon_json.write_bytes(setup[1])
    before = snapshot(tmp_path)
    env = {
        "MIRROR_CONFIG_PATH": str(certs),
        "MIRROR_DAEMON_JSON": str(daemon_json),
        "MIRROR_CERTS_DIR": str(docker_certs_d),
        "MIRROR_DOCKER_HOST": f"unix://{tmp_path / 'no-daemon.sock'}",
    }
    result = run_cli(*args, env=env)
    assert result.returncode == status
    assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


def test_cli_no_mirror_at_all_is_one_line(tmp_path: Path) -> None:
    env = {"MIRROR_MIRROR": "", "MIRROR_CONFIG_PATH": str(tmp_path)}
    result = run_cli("configure", "containerd", env=env)
    assert result.returncode == 1
    assert result.stderr == "mirror: error: no --mirror given: nothing to point containerd at\n"
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_environment_list_is_one_line(tmp_path: Path) -> None:
    env = {"MIRROR_MIRROR": "http://a:1 ftp://b", "MIRROR_DAEMON_JSON": str(tmp_path / "d.json")}
    result = run_cli("configure", "docker", env=env)
    assert result.returncode == 1
    assert result.stderr == (
        "mirror: error: MIRROR_MIRROR: invalid mirror URL 'ftp://b': "
        "mirror 'ftp://b': URL must start with http:// or https://\n"
    )
    assert list(tmp_path.iterdir()) == []


# --- building blocks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("http://127.0.0.1:5000", MIRROR), ("https://m.example/", "https://m.example")],
)
def test_mirror_url_is_an_origin(text: str, expected: str) -> None:
    assert parse_mirror_url(text) == expected


@pytest.mark.parametrize(
    "text",
    ["127.0.0.1:5000", "http://", "http://u:p@h", "http://h/x", "http://h?q", "http://h:99999"],
)
def test_mirror_url_rejects_what_runtimes_would_misuse(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_mirror_url(text)


def test_toml_writer_round_trips_what_tomllib_reads() -> None:
    document = tomllib.loads(
        OPERATOR_HOSTS.decode()
        + 'odd = "quote \\" back \\\\ tab \\t del \\u007f é"\n'
        + "[[list]]\nnumber = 1.5\nwhen = 1979-05-27T07:32:00Z\n"
        + "[empty]\n"
    )
    assert tomllib.loads(tomlwrite.dumps(document, header="a\nb")) == document


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "f"
    files.write(path, b"one")
    files.write(path, b"two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "f.mirror-absent"]
    assert path.read_bytes() == b"two"


# --- docker: certs.d hosts.toml (Docker 28+ on the containerd image store) -----------------

DOCKER_HEADER = (
    "# Written by `mirror configure docker`; `mirror cleanup docker` restores the original.\n\n"
)
SNAPSHOTTER = [["driver-type", "io.containerd.snapshotter.v1"]]
# `GET /info` as Docker answers it, reduced to what mirror reads.
EngineInfo = dict[str, object]
CONTAINERD_STORE_28: EngineInfo = {"ServerVersion": "28.0.1", "DriverStatus": SNAPSHOTTER}
CONTAINERD_STORE_27: EngineInfo = {"ServerVersion": "27.3.1", "DriverStatus": SNAPSHOTTER}
CLASSIC_STORE: EngineInfo = {"ServerVersion": "20.10.24", "DriverStatus": None}


class FakeEngine:
    """A Docker Engine API on a Unix socket answering `/version` and `/info` with `info`.

    The Docker SDK negotiates the API version (`GET /version`) and then asks `GET /vX/info`:
    the same requests `mirror configure docker --certs-d auto` makes of a real daemon.
    """

    def __init__(self, directory: Path, info: EngineInfo) -> None:
        self.info = info
        self.paths: list[str] = []
        directory.mkdir()
        self.socket = directory / "docker.sock"
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                engine.paths.append(self.path)
                route = self.path.split("?")[0].rsplit("/", 1)[-1]
                answers: dict[str, object] = {
                    "version": {"ApiVersion": "1.47", "MinAPIVersion": "1.24"},
                    "info": engine.info,
                }
                body = json.dumps(answers.get(route, {"message": "page not found"})).encode()
                self.send_response(200 if route in answers else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # a Unix socket peer has no address to log

        self.server = socketserver.ThreadingUnixStreamServer(str(self.socket), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def asked(self) -> bool:
        return any(path.endswith("/info") for path in self.paths)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_engine() -> Iterator[Callable[[EngineInfo], FakeEngine]]:
    # Not under tmp_path: sun_path is 108 bytes and pytest's paths can be longer.
    directory = Path(tempfile.mkdtemp(prefix="mirror-engine-"))
    started: list[FakeEngine] = []

    def start(info: EngineInfo) -> FakeEngine:
        engine = FakeEngine(directory / str(len(started)), info)
        started.append(engine)
        return engine

    try:
        yield start
    finally:
        for engine in started:
            engine.close()
        shutil.rmtree(directory, ignore_errors=True)


def docker_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "configure",
        "docker",
        f"--daemon-json={tmp_path / 'daemon.json'}",
        f"--certs-dir={tmp_path / 'certs.d'}",
        *extra,
    ]


def test_docker_auto_writes_hosts_toml_when_the_engine_says_containerd_store_28(
    tmp_path: Path,
    fake_engine: Callable[[EngineInfo], FakeEngine],
    capsys: pytest.CaptureFixture[str],
) -> None:
    engine = fake_engine(CONTAINERD_STORE_28)
    certs = tmp_path / "certs.d"
    # A registry with Docker-style certificates: its directory wins over _default, so it gets
    # a file too, carrying the CA that dockerd would otherwise have read from the directory.
    (certs / "registry.example:5000").mkdir(parents=True)
    (certs / "registry.example:5000" / "ca.crt").write_text("a CA\n")

    assert main(docker_args(tmp_path, f"--docker-host={engine.host}"), {}) == 0
    out = capsys.readouterr().out
    assert engine.asked
    assert "dockerd 28.0.1 uses the containerd image store" in out
    assert json.loads((tmp_path / "daemon.json").read_bytes()) == {"registry-mirrors": [MIRROR]}
    assert (certs / "_default" / "hosts.toml").read_text() == DOCKER_HEADER + (
        '[host."http://127.0.0.1:5000"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        '  dial_timeout = "1s"\n'
    )
    document = tomllib.loads((certs / "registry.example:5000" / "hosts.toml").read_text())
    assert document == {
        "server": "https://registry.example:5000",
        "ca": ["ca.crt"],
        "host": {MIRROR: {"capabilities": ["pull", "resolve"], "dial_timeout": "1s"}},
    }
    assert "dockerd reads hosts.toml at every pull" in out


@pytest.mark.parametrize(
    ("info", "needle"),
    [
        (CLASSIC_STORE, "dockerd 20.10.24 uses the classic image store"),
        (CONTAINERD_STORE_27, "reads hosts.toml only from Docker 28"),
    ],
)
def test_docker_auto_writes_no_hosts_toml_where_dockerd_does_not_read_them(
    tmp_path: Path,
    fake_engine: Callable[[EngineInfo], FakeEngine],
    capsys: pytest.CaptureFixture[str],
    info: EngineInfo,
    needle: str,
) -> None:
    certs = tmp_path / "certs.d"
    (certs / "quay.io").mkdir(parents=True)
    (certs / "quay.io" / "hosts.toml").write_bytes(OPERATOR_HOSTS)
    before = snapshot(certs)
    # Files an earlier run wrote (the daemon has changed store since) are restored.
    assert main(docker_args(tmp_path, "--certs-d=yes"), {}) == 0
    assert (certs / "_default" / "hosts.toml").is_file()

    engine = fake_engine(info)
    assert main(docker_args(tmp_path, f"--docker-host={engine.host}"), {}) == 0
    out = capsys.readouterr().out
    assert engine.asked and needle in out
    # The other route, spelled with this node's mirror: any registry by the path-prefix form.
    assert "127.0.0.1:5000/ghcr.io/org/app:1.0" in out
    assert "127.0.0.1:5000/registry.internal_5000/app:1.0" in out
    assert snapshot(certs) == before
    assert json.loads((tmp_path / "daemon.json").read_bytes()) == {"registry-mirrors": [MIRROR]}


def test_docker_auto_without_an_answer_leaves_certs_d_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = tmp_path / "certs.d"
    assert main(docker_args(tmp_path, "--certs-d=yes"), {}) == 0
    written = snapshot(certs)
    missing = f"unix://{tmp_path / 'no-daemon.sock'}"
    # MIRROR_DOCKER_HOST wins over DOCKER_HOST, as for `mirror run`.
    environ = {"MIRROR_DOCKER_HOST": missing, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    assert main(docker_args(tmp_path), environ) == 0
    out = capsys.readouterr().out
    assert f"Docker daemon at {missing}" in out
    assert f"left {certs} as it is" in out and "--certs-d yes" in out
    assert snapshot(certs) == written
    assert "registry-mirrors" in (tmp_path / "daemon.json").read_text()


@pytest.mark.parametrize(("mode", "written"), [("yes", True), ("no", False)])
def test_docker_certs_d_yes_or_no_does_not_ask_the_engine(
    tmp_path: Path,
    fake_engine: Callable[[EngineInfo], FakeEngine],
    mode: str,
    written: bool,
) -> None:
    # The engine would answer the opposite of what is forced.
    engine = fake_engine(CLASSIC_STORE if written else CONTAINERD_STORE_28)
    certs = tmp_path / "certs.d"
    if not written:
        assert main(docker_args(tmp_path, "--certs-d=yes"), {}) == 0
    environ = {"MIRROR_CERTS_D": mode, "MIRROR_DOCKER_HOST": engine.host}
    assert main(docker_args(tmp_path), environ) == 0
    assert not engine.asked
    assert (certs / "_default" / "hosts.toml").is_file() == written
    assert certs.exists() == written  # mirror made the directory, and removes it again


def test_docker_cleanup_restores_certs_d_and_daemon_json_byte_identical(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    (certs / "docker.io").mkdir(parents=True)
    (certs / "docker.io" / "hosts.toml").write_bytes(OPERATOR_HOSTS)
    os.chmod(certs / "docker.io" / "hosts.toml", 0o600)
    (certs / "registry.example").mkdir()
    for name in ("ca.crt", "me.cert", "me.key"):
        (certs / "registry.example" / name).write_text(name)
    (certs / "notes.txt").write_text("keep me")
    (tmp_path / "daemon.json").write_bytes(DAEMON_JSON)
    before = snapshot(tmp_path)

    args = docker_args(tmp_path, "--certs-d=yes", "--mirror=http://10.0.0.7:5000")
    assert main(args, {}) == 0
    written = snapshot(tmp_path)
    assert main(args, {}) == 0
    assert snapshot(tmp_path) == written  # idempotent, the first backups kept
    assert (certs / "docker.io" / "hosts.toml.mirror-backup").read_bytes() == OPERATOR_HOSTS
    assert sorted(p.parent.name for p in certs.glob("*/hosts.toml")) == [
        "_default",
        "docker.io",
        "registry.example",
    ]
    assert main([*args, "--prepend-existing"], {}) == 0
    document = tomllib.loads((certs / "docker.io" / "hosts.toml").read_text())
    # Ours first; the operator's hosts after, as the operator spelled them.
    assert list(document["host"]) == [
        "http://10.0.0.7:5000",
        "https://cache.example",
        "http://127.0.0.1:5000/",
    ]

    result = run_cli(
        "cleanup",
        "docker",
        env={"MIRROR_DAEMON_JSON": str(tmp_path / "daemon.json"), "MIRROR_CERTS_DIR": str(certs)},
    )
    assert result.returncode == 0, result.stderr
    assert f"restored {certs / 'docker.io' / 'hosts.toml'}" in result.stdout
    assert f"removed {certs / '_default'}" in result.stdout
    assert snapshot(tmp_path) == before
    assert docker_certs.cleanup(tmp_path / "daemon.json", certs) == [
        f"nothing to restore: mirror never wrote {tmp_path / 'daemon.json'}"
    ]


def test_docker_insecure_registries_get_files_of_their_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a mirror listed, dockerd stops applying insecure-registries to a registry: its
    file must say it, with containerd's spelling (http:// plus TLS settings: HTTPS without
    verification first, then HTTP)."""
    daemon_json = {
        "insecure-registries": [
            "reg.local:5000",
            "http://Other.Example",
            "10.0.0.0/8",
            "127.0.0.0/8",
            "-bad",
        ],
    }
    (tmp_path / "daemon.json").write_text(json.dumps(daemon_json))
    args = docker_args(tmp_path, "--certs-d=yes", "--upstream=other.example=https://o.internal")
    assert main(args, {}) == 0
    out = capsys.readouterr().out
    certs = tmp_path / "certs.d"
    assert sorted(p.parent.name for p in certs.glob("*/hosts.toml")) == [
        "_default",
        "other.example",
        "reg.local:5000",
    ]
    local = tomllib.loads((certs / "reg.local:5000" / "hosts.toml").read_text())
    assert (local["server"], local["skip_verify"]) == ("http://reg.local:5000", True)
    other = tomllib.loads((certs / "other.example" / "hosts.toml").read_text())
    assert (other["server"], other["skip_verify"]) == ("https://o.internal", True)
    assert "insecure-registries range 10.0.0.0/8" in out
    assert "127.0.0.0/8" not in out  # containerd treats loopback as insecure by itself
    assert "skip_verify" not in (certs / "_default" / "hosts.toml").read_text()
    # Only the registries asked for when they are named.
    assert main([*args, "--mirrored-registries=docker.io"], {}) == 0
    assert [p.parent.name for p in certs.glob("*/hosts.toml")] == ["docker.io"]
    assert "insecure-registries range" not in capsys.readouterr().out


def test_docker_a_malformed_file_stops_the_run_with_nothing_changed(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    (certs / "quay.io").mkdir(parents=True)
    (certs / "quay.io" / "hosts.toml").write_text("[host\n")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"quay\.io/hosts\.toml is not valid TOML"):
        docker_certs.configure(
            DockerConfig(tmp_path / "daemon.json", (MIRROR,), certs, CertsMode.YES),
            ask=pytest.fail,
        )
    assert snapshot(tmp_path) == before
    (certs / "quay.io" / "hosts.toml").unlink()
    (tmp_path / "daemon.json").write_text('{"insecure-registries": "reg.local"}')
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match='"insecure-registries" must be a list'):
        docker_certs.configure(
            DockerConfig(tmp_path / "daemon.json", (MIRROR,), certs, CertsMode.YES),
            ask=pytest.fail,
        )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("version", "containerd_store", "reads"),
    [
        ("28.0.0", True, True),
        ("29.1.2", True, True),
        ("27.5.1", True, False),
        ("24.0.7", True, False),
        ("dev", True, True),  # a build with no release number: new
        ("29.1.2", False, False),
        ("20.10.24+dfsg1", False, False),
    ],
)
def test_which_dockerd_reads_hosts_toml(version: str, containerd_store: bool, reads: bool) -> None:
    assert docker_certs.reads_hosts_toml(DaemonStore(version, containerd_store)) == reads


# --- containers: registries.conf.d drop-in (CRI-O, Podman, Buildah, skopeo) ---------------

CONTAINERS_HEADER = (
    "# Written by `mirror configure containers`; `mirror cleanup containers` restores the "
    "original.\n\n"
)


def containers_config(registries_dir: Path, **overrides: object) -> ContainersRegistriesConfig:
    settings: dict[str, object] = {
        "registries_dir": registries_dir,
        "mirrors": (MIRROR,),
        "registries": ("docker.io",),
    }
    settings.update(overrides)
    return ContainersRegistriesConfig(**settings)  # type: ignore[arg-type]


def drop_in(registries_dir: Path) -> dict[str, dict[str, Any]]:
    """The drop-in's entries by prefix."""
    document = tomllib.loads((registries_dir / containers_registries.DROP_IN).read_text())
    return {table["prefix"]: table for table in document["registry"]}


def test_containers_drop_in_sends_each_registry_to_the_mirror_path_prefix(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "registries.conf.d"
    config = containers_config(
        directory,
        mirrors=(MIRROR, "https://mirror.example"),
        registries=("docker.io", "Registry.Internal:5000"),
    )
    messages = containers_registries.configure(config)
    assert (directory / "99-mirror.conf").read_text() == CONTAINERS_HEADER + (
        "[[registry]]\n"
        'prefix = "docker.io"\n'
        'location = "docker.io"\n'
        "\n"
        "  [[registry.mirror]]\n"
        '  location = "127.0.0.1:5000/docker.io"\n'
        "  insecure = true\n"
        "\n"
        "  [[registry.mirror]]\n"
        '  location = "mirror.example/docker.io"\n'
        "\n"
        "[[registry]]\n"
        'prefix = "registry.internal:5000"\n'
        'location = "registry.internal:5000"\n'
        "\n"
        "  [[registry.mirror]]\n"
        '  location = "127.0.0.1:5000/registry.internal_5000"\n'
        "  insecure = true\n"
        "\n"
        "  [[registry.mirror]]\n"
        '  location = "mirror.example/registry.internal_5000"\n'
    )
    assert sorted(p.name for p in directory.iterdir()) == [
        "99-mirror.conf",
        "99-mirror.conf.mirror-absent",
    ]
    assert messages[-1] == containers_registries.RELOAD_HINT
    assert "  registry.internal:5000: 127.0.0.1:5000/registry.internal_5000, " in "\n".join(
        messages
    )


def test_containers_upstream_is_the_location_and_plain_http_makes_it_insecure(
    tmp_path: Path,
) -> None:
    upstream = (("ghcr.io", "http://10.1.1.1:5000"), ("quay.io", "https://quay.corp"))
    config = containers_config(tmp_path, registries=("ghcr.io", "quay.io"), upstream=upstream)
    containers_registries.configure(config)
    entries = drop_in(tmp_path)
    assert (entries["ghcr.io"]["location"], entries["ghcr.io"].get("insecure")) == (
        "10.1.1.1:5000",
        True,
    )
    assert (entries["quay.io"]["location"], entries["quay.io"].get("insecure")) == (
        "quay.corp",
        None,
    )


def test_containers_resolve_tags_false_sends_the_mirror_digest_pulls_only(
    tmp_path: Path,
) -> None:
    # containers/image refuses pull-from-mirror beside a registry's mirror-by-digest-only.
    (tmp_path / "registries.conf").write_text(
        '[[registry]]\nlocation = "quay.io"\nmirror-by-digest-only = true\n'
    )
    directory = tmp_path / "registries.conf.d"
    config = containers_config(directory, registries=("docker.io", "quay.io"), resolve_tags=False)
    containers_registries.configure(config)
    entries = drop_in(directory)
    assert entries["docker.io"]["mirror"] == [
        {
            "location": "127.0.0.1:5000/docker.io",
            "insecure": True,
            "pull-from-mirror": "digest-only",
        }
    ]
    assert entries["quay.io"]["mirror-by-digest-only"] is True
    assert entries["quay.io"]["mirror"] == [
        {"location": "127.0.0.1:5000/quay.io", "insecure": True}
    ]


def test_containers_default_is_the_common_the_upstream_and_the_configured_registries(
    tmp_path: Path,
) -> None:
    (tmp_path / "registries.conf").write_text(
        '[[registry]]\nlocation = "registry.corp"\n\n'
        '[[registry]]\nprefix = "registry.corp/team"\nlocation = "other.corp/team"\n\n'
        '[[registry]]\nprefix = "*.example.com"\n'
    )
    directory = tmp_path / "registries.conf.d"
    directory.mkdir()
    (directory / "50-local.conf").write_text('[[registry]]\nlocation = "localhost:5000"\n')
    config = containers_config(
        directory, registries=None, upstream=(("r.local:5000", "http://10.0.0.9:5000"),)
    )
    containers_registries.configure(config)
    assert list(drop_in(directory)) == [
        *containers_registries.COMMON_REGISTRIES,
        "r.local:5000",
        "registry.corp",
        "localhost:5000",
    ]


def test_containers_entries_read_before_the_drop_in_are_carried_over(tmp_path: Path) -> None:
    """containers/image replaces an entry of the same prefix whole: what it said must stay."""
    (tmp_path / "registries.conf").write_text(
        '[[registry]]\nprefix = "docker.io"\nlocation = "hub.corp/docker"\ninsecure = true\n'
        '[[registry.mirror]]\nlocation = "cache.corp/docker"\n'
        '[[registry.mirror]]\nlocation = "127.0.0.1:5000/docker.io/"\n\n'
        '[[registry]]\nlocation = "blocked.example"\nblocked = true\n'
    )
    directory = tmp_path / "registries.conf.d"
    directory.mkdir()
    # A drop-in read before ours wins over the main file for its prefix.
    (directory / "10-team.conf").write_text('[[registry]]\nlocation = "ghcr.io"\nblocked = false\n')
    registries = ("docker.io", "blocked.example", "ghcr.io")
    messages = containers_registries.configure(containers_config(directory, registries=registries))
    entries = drop_in(directory)
    assert entries["docker.io"] == {
        "prefix": "docker.io",
        "location": "hub.corp/docker",
        "insecure": True,
        "mirror": [
            {"location": "127.0.0.1:5000/docker.io", "insecure": True},
            {"location": "cache.corp/docker"},
        ],
    }
    assert entries["blocked.example"]["blocked"] is True
    assert entries["ghcr.io"]["blocked"] is False
    assert any(
        line.startswith(f"ghcr.io: kept what {directory / '10-team.conf'}") for line in messages
    )


def test_containers_a_drop_in_read_after_ours_is_reported(tmp_path: Path) -> None:
    (tmp_path / "zz-late.conf").write_text('[[registry]]\nlocation = "docker.io"\n')
    messages = containers_registries.configure(containers_config(tmp_path))
    assert (
        f"warning: {tmp_path / 'zz-late.conf'} is read after {tmp_path / '99-mirror.conf'} and "
        "configures docker.io too: its entry wins, so docker.io does not go to the mirror"
    ) in messages
    assert (tmp_path / "zz-late.conf").read_text() == '[[registry]]\nlocation = "docker.io"\n'


def test_containers_an_unreadable_other_file_is_noted_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "10-broken.conf").write_text("[[registry]\n")
    messages = containers_registries.configure(containers_config(tmp_path))
    assert any(
        line.startswith(f"note: {tmp_path / '10-broken.conf'} is not valid TOML")
        for line in messages
    )
    assert "docker.io" in drop_in(tmp_path)


@pytest.mark.parametrize("registry", ["[::1]:5000", "myregistry"])
def test_containers_a_registry_that_cannot_be_a_path_component_is_skipped(
    tmp_path: Path, registry: str
) -> None:
    config = containers_config(tmp_path, registries=("docker.io", registry))
    messages = containers_registries.configure(config)
    assert list(drop_in(tmp_path)) == ["docker.io"]
    [skipped] = [line for line in messages if line.startswith("skipped ")]
    assert f"skipped {registry}: " in skipped
    assert f"--upstream NAME=https://{registry}" in skipped
    # Nothing left to write: an error, and nothing written.
    with pytest.raises(ConfigError, match="cannot be a path component"):
        containers_registries.configure(containers_config(tmp_path / "x", registries=(registry,)))
    assert not (tmp_path / "x").exists()


def test_containers_one_location_with_two_insecure_settings_is_refused(tmp_path: Path) -> None:
    upstream = (("a.example", "http://10.0.0.1:5000"), ("b.example", "https://10.0.0.1:5000"))
    config = containers_config(tmp_path, registries=("a.example", "b.example"), upstream=upstream)
    with pytest.raises(ConfigError, match=r"would both have location 10\.0\.0\.1:5000"):
        containers_registries.configure(config)
    assert list(tmp_path.iterdir()) == []


OPERATOR_DROP_IN = b"""# the operator's file, under the name mirror uses
unqualified-search-registries = ["registry.corp"]

[[registry]]
location = "registry.corp"
insecure = true

[[registry]]
location = "docker.io"
  [[registry.mirror]]
  location = "cache.corp/docker"

[aliases]
"app" = "registry.corp/team/app"
"""


def test_containers_an_original_under_our_name_keeps_all_it_says(tmp_path: Path) -> None:
    (tmp_path / "99-mirror.conf").write_bytes(OPERATOR_DROP_IN)
    containers_registries.configure(containers_config(tmp_path))
    document = tomllib.loads((tmp_path / "99-mirror.conf").read_text())
    assert document["unqualified-search-registries"] == ["registry.corp"]
    assert document["aliases"] == {"app": "registry.corp/team/app"}
    assert document["registry"] == [
        {"location": "registry.corp", "insecure": True},
        {
            "prefix": "docker.io",
            "location": "docker.io",
            "mirror": [
                {"location": "127.0.0.1:5000/docker.io", "insecure": True},
                {"location": "cache.corp/docker"},
            ],
        },
    ]
    assert (tmp_path / "99-mirror.conf.mirror-backup").read_bytes() == OPERATOR_DROP_IN


def test_containers_configure_twice_and_cleanup_are_byte_exact(tmp_path: Path) -> None:
    directory = tmp_path / "registries.conf.d"
    directory.mkdir()
    (directory / "000-shortnames.conf").write_text('[aliases]\n"x" = "docker.io/library/x"\n')
    (directory / "99-mirror.conf").write_bytes(OPERATOR_DROP_IN)
    os.chmod(directory / "99-mirror.conf", 0o600)
    before = snapshot(tmp_path)
    config = containers_config(directory, registries=("docker.io", "ghcr.io"))
    containers_registries.configure(config)
    first = snapshot(tmp_path)
    containers_registries.configure(config)
    assert snapshot(tmp_path) == first
    # Even after someone edits our file, configure starts again from the original.
    (directory / "99-mirror.conf").write_text("edited\n")
    containers_registries.configure(config)
    assert snapshot(tmp_path) == first
    messages = containers_registries.cleanup(directory)
    assert messages[0] == f"restored {directory / '99-mirror.conf'}"
    assert snapshot(tmp_path) == before
    assert containers_registries.cleanup(directory) == [
        f"nothing to restore: mirror never wrote {directory / '99-mirror.conf'}"
    ]


def test_containers_round_trip_without_the_directory_leaves_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "etc" / "containers" / "registries.conf.d"
    containers_registries.configure(containers_config(directory))
    messages = containers_registries.cleanup(directory)
    assert f"removed {tmp_path / 'etc'}" in messages
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"[[registry]\n", "is not valid TOML"),
        (b'registry = "docker.io"\n', "has [[registry]] entries containers/image cannot use"),
        (b"[[registry]]\ninsecure = true\n", "has [[registry]] entries"),
        (b'[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\ninsecure = true\n', "has [["),
        (b"\xff\n", "is not valid TOML"),
    ],
)
def test_containers_a_malformed_original_is_refused_untouched(
    tmp_path: Path, content: bytes, needle: str
) -> None:
    (tmp_path / "99-mirror.conf").write_bytes(content)
    with pytest.raises(ConfigError) as error:
        containers_registries.configure(containers_config(tmp_path))
    assert needle in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["99-mirror.conf"]
    assert (tmp_path / "99-mirror.conf").read_bytes() == content


def test_cli_containers_round_trip_with_environment_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "registries.conf.d"
    environ = {
        "MIRROR_REGISTRIES_DIR": str(directory),
        "MIRROR_MIRROR": "http://127.0.0.1:5000 https://127.0.0.2:5443",
        "MIRROR_MIRRORED_REGISTRIES": "docker.io ghcr.io",
        "MIRROR_UPSTREAM": "ghcr.io=http://10.0.0.1:5000",
        "MIRROR_RESOLVE_TAGS": "false",
    }
    assert main(["configure", "containers"], environ) == 0
    assert f"wrote {directory / '99-mirror.conf'}" in capsys.readouterr().out
    entries = drop_in(directory)
    assert list(entries) == ["docker.io", "ghcr.io"]
    assert entries["ghcr.io"]["location"] == "10.0.0.1:5000"
    assert [m["location"] for m in entries["ghcr.io"]["mirror"]] == [
        "127.0.0.1:5000/ghcr.io",
        "127.0.0.2:5443/ghcr.io",
    ]
    # A flag on the command line wins over the environment.
    main_file = tmp_path / "main.conf"
    main_file.write_text('[[registry]]\nlocation = "quay.io"\n')
    argv = ["configure", "containers", f"--registries-conf={main_file}", "--resolve-tags=true"]
    assert main(argv, {**environ, "MIRROR_MIRRORED_REGISTRIES": ""}) == 0
    assert "quay.io" in drop_in(directory)
    assert main(["cleanup", "containers"], {"MIRROR_REGISTRIES_DIR": str(directory)}) == 0
    assert not directory.exists()


@pytest.mark.parametrize(
    ("args", "drop_in_bytes", "status", "needle"),
    [
        (["configure", "containers", "--mirror=ftp://x"], None, 2, "invalid mirror URL"),
        (["configure", "containers", "--upstream=nope"], None, 2, "is not REGISTRY=URL"),
        (["configure", "containers", "--mirrored-registries=[::1]:5000"], None, 1, "path comp"),
        (["configure", "containers"], b"[[registry]\n", 1, "99-mirror.conf is not valid TOML"),
        (["configure", "containers"], b"registry = 1\n", 1, "entries containers/image cannot"),
    ],
)
def test_cli_containers_errors_are_one_line(
    tmp_path: Path, args: list[str], drop_in_bytes: bytes | None, status: int, needle: str
) -> None:
    directory = tmp_path / "registries.conf.d"
    directory.mkdir()
    if drop_in_bytes is not None:
        (directory / "99-mirror.conf").write_bytes(drop_in_bytes)
    before = snapshot(tmp_path)
    result = run_cli(*args, env={"MIRROR_REGISTRIES_DIR": str(directory)})
    assert result.returncode == status
    assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


def test_cli_containers_a_file_where_the_directory_should_be_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "registries.conf.d").write_text("not a directory\n")
    result = run_cli(
        "configure", "containers", f"--registries-dir={tmp_path / 'registries.conf.d'}"
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Not a directory" in result.stderr, result.stderr
