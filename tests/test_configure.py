"""`mirror configure` / `mirror cleanup`: the files written, idempotency, exact restoration."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mirror.cli import main
from mirror.errors import ConfigError
from mirror.runtime import containerd_hosts, docker_daemon, files, tomlwrite
from mirror.runtime.containerd_hosts import ContainerdHostsConfig
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
    result = run_cli("configure", "docker", env={"MIRROR_DAEMON_JSON": str(path)})
    assert result.returncode == 0, result.stderr
    assert "SIGHUP" in result.stdout
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
    ],
)
def test_cli_errors_are_one_line(
    tmp_path: Path, args: list[str], setup: tuple[str, bytes] | None, status: int, needle: str
) -> None:
    certs, daemon_json = tmp_path / "certs.d", tmp_path / "daemon.json"
    if setup is not None and setup[0] == "hosts":
        (certs / "docker.io").mkdir(parents=True)
        (certs / "docker.io" / "hosts.toml").write_bytes(setup[1])
    if setup is not None and setup[0] == "json":
        daemon_json.write_bytes(setup[1])
    before = snapshot(tmp_path)
    env = {"MIRROR_CONFIG_PATH": str(certs), "MIRROR_DAEMON_JSON": str(daemon_json)}
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
