"""The command line: one-line errors, environment defaults, and a real node process."""

import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from harness.net import free_port, wait_for_http

from mirror.cli import OTHER_VARIABLES, build_parser, orchestrator_env, run_config
from mirror.config import DEFAULT_DOCKER_HOST, Address, PeerTransfer, StoreKind
from mirror.routing.bootstrap import NomadBootstrap
from mirror.routing.bootstrap.env import (
    SERVICE_ACCOUNT_DIR,
    KubernetesEnv,
    NomadEnv,
    OrchestratorEnv,
)


def run_mirror(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--store", "floppy"], "invalid store 'floppy'"),
        (["run", "--registry-addr", "nowhere"], "invalid address 'nowhere'"),
        (["run", "--registry-addr", "1.2.3.4:99999"], "out of range"),
        (["run", "--no-such-flag"], "unrecognized arguments"),
        (["explode"], "invalid choice"),
    ],
)
def test_bad_flags_give_one_line(args: list[str], needle: str) -> None:
    result = run_mirror(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and needle in result.stderr
    assert "Traceback" not in result.stderr


def test_environment_supplies_defaults_and_flags_win() -> None:
    environ = {"MIRROR_STORE": "cache", "MIRROR_REGISTRY_ADDR": "127.0.0.1:5123"}
    config = run_config(build_parser(environ).parse_args(["run"]))
    assert config.store is StoreKind.CACHE
    assert config.registry_addr == Address("127.0.0.1", 5123)
    override = run_config(build_parser(environ).parse_args(["run", "--store", "auto"]))
    assert override.store is StoreKind.AUTO


@pytest.mark.parametrize(
    ("args", "shows_receiving", "expected"),
    [
        ([], True, PeerTransfer.REDIRECT),
        ([], False, PeerTransfer.SHARE),
        (["--peer-transfer", "share"], True, PeerTransfer.SHARE),
        (["--peer-transfer", "redirect"], False, PeerTransfer.REDIRECT),
    ],
)
def test_peer_transfer_defaults_to_redirect_where_the_store_shows_receiving(
    args: list[str], shows_receiving: bool, expected: PeerTransfer
) -> None:
    """auto: a containerd node redirects (peers are served from its runtime's own download),
    a Docker or cache-only node shares (only its own fetch can be shared while it arrives)."""
    config = run_config(build_parser({}).parse_args(["run", *args]))
    assert config.routing.peer_transfer.for_store(shows_receiving) is expected


@pytest.mark.parametrize(
    ("args", "environ", "expected"),
    [
        ([], {}, DEFAULT_DOCKER_HOST),
        ([], {"DOCKER_HOST": "tcp://docker:2375"}, "tcp://docker:2375"),
        ([], {"DOCKER_HOST": ""}, DEFAULT_DOCKER_HOST),
        (
            [],
            {"DOCKER_HOST": "tcp://docker:2375", "MIRROR_DOCKER_HOST": "unix:///d.sock"},
            "unix:///d.sock",
        ),
        (
            ["--docker-host", "unix:///flag.sock"],
            {"DOCKER_HOST": "tcp://docker:2375", "MIRROR_DOCKER_HOST": "unix:///d.sock"},
            "unix:///flag.sock",
        ),
    ],
)
def test_docker_host_flag_then_mirror_variable_then_docker_host(
    args: list[str], environ: dict[str, str], expected: str
) -> None:
    config = run_config(build_parser(environ).parse_args(["run", *args]))
    assert config.docker_host == expected


class _Recording(Mapping[str, str]):
    """A mapping of variables that remembers every name asked for (``get`` goes through
    ``__getitem__``)."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.asked: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.asked.add(name)
        return self.values[name]

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("the parser must ask for names, not list the environment")

    def __len__(self) -> int:
        return len(self.values)


def test_variables_read_are_flags_or_documented() -> None:
    """Every name the parser asks for is a MIRROR_<FLAG> or listed in OTHER_VARIABLES."""
    recording = _Recording({})
    build_parser(recording)
    others = {name for name in recording.asked if not name.startswith("MIRROR_")}
    assert others == set(OTHER_VARIABLES)


def test_orchestrator_env_is_built_from_the_given_mapping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The process's own variables play no part: only the mapping handed to the parser does.
    monkeypatch.setenv("NOMAD_ADDR", "http://elsewhere:4646")
    assert orchestrator_env({}) == OrchestratorEnv()
    assert OrchestratorEnv().kubernetes.service_account_dir == SERVICE_ACCOUNT_DIR
    variables = {
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
        "NOMAD_ADDR": "https://nomad:4646",
        "NOMAD_TOKEN": "secret",
        "NOMAD_NAMESPACE": "mirror",
        "NOMAD_REGION": "europe",
        "NOMAD_SKIP_VERIFY": "false",
        "NOMAD_CACERT": "/tls/ca.pem",
        "NOMAD_CAPATH": "/tls/cas",
        "NOMAD_CLIENT_CERT": "/tls/cli.pem",
        "NOMAD_CLIENT_KEY": "/tls/cli-key.pem",
        "NOMAD_TLS_SERVER_NAME": "server.global.nomad",
    }
    assert orchestrator_env(variables) == OrchestratorEnv(
        kubernetes=KubernetesEnv(service_host="10.96.0.1", service_port="443"),
        nomad=NomadEnv(
            addr="https://nomad:4646",
            token="secret",
            namespace="mirror",
            region="europe",
            skip_verify="false",
            cacert="/tls/ca.pem",
            capath="/tls/cas",
            client_cert="/tls/cli.pem",
            client_key="/tls/cli-key.pem",
            tls_server_name="server.global.nomad",
        ),
    )
    # An empty variable is an unset one, as the nomad CLI and client-go treat it.
    assert orchestrator_env({"NOMAD_TOKEN": "", "KUBERNETES_SERVICE_HOST": ""}) == OrchestratorEnv()


def test_bootstrap_gets_the_orchestrator_variables_given(tmp_path: Path) -> None:
    from mirror.clusterkey import ClusterKey

    key_file = tmp_path / "cluster.key"
    key_file.write_text(ClusterKey.generate())
    environ = {
        "MIRROR_CLUSTER_KEY_FILE": str(key_file),
        "MIRROR_BOOTSTRAP": "nomad:mirror",
        "NOMAD_ADDR": "http://192.0.2.1:4646",
        "NOMAD_NAMESPACE": "mirror",
    }
    config = run_config(build_parser(environ).parse_args(["run"]))
    (source,) = config.routing.bootstrap
    assert isinstance(source, NomadBootstrap)
    assert str(source.settings.address) == "http://192.0.2.1:4646/"
    assert source.settings.namespace == "mirror"


def test_bad_orchestrator_variable_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("x" * 43)
    result = subprocess.run(
        [sys.executable, "-m", "mirror", "run", "--store=cache", "--cluster-key-file=k"],
        capture_output=True,
        text=True,
        timeout=30,
        env={
            "PATH": "/usr/bin:/bin",
            "MIRROR_BOOTSTRAP": "nomad:mirror",
            "NOMAD_ADDR": "ftp://nomad:4646",
        },
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "NOMAD_ADDR 'ftp://nomad:4646': expected http://" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_bad_environment_value_is_one_line() -> None:
    result = run_mirror("run", env={"MIRROR_LOG_LEVEL": "loud", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "invalid log level 'loud'" in result.stderr
    assert result.stderr.count("\n") == 1


def test_unreachable_containerd_socket_is_one_line(tmp_path: Path) -> None:
    result = run_mirror(
        "run",
        "--store=containerd",
        f"--containerd-sock={tmp_path / 'absent.sock'}",
        f"--cache-dir={tmp_path / 'cache'}",
        f"--registry-addr=127.0.0.1:{free_port()}",
        f"--metrics-addr=127.0.0.1:{free_port()}",
    )
    assert result.returncode == 1
    assert result.stderr.startswith("mirror: error: containerd at ")
    assert result.stderr.count("\n") == 1


def test_busy_port_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_mirror(
            "run",
            "--store=cache",
            f"--cache-dir={tmp_path / 'cache'}",
            f"--registry-addr=127.0.0.1:{port}",
            f"--metrics-addr=127.0.0.1:{free_port()}",
        )
    assert result.returncode == 1
    # Log lines of the start-up may precede it; the error itself is one line, the last.
    errors = [line for line in result.stderr.splitlines() if line.startswith("mirror: error:")]
    assert len(errors) == 1 and "cannot listen on 127.0.0.1:" in errors[0]
    assert result.stderr.splitlines()[-1] == errors[0] and "Traceback" not in result.stderr


def test_node_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """`auto` with no containerd falls back to the node cache; SIGTERM ends it with status 0."""
    registry_port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mirror",
            "run",
            f"--containerd-sock={tmp_path / 'absent.sock'}",
            f"--cache-dir={tmp_path / 'cache'}",
            f"--registry-addr=127.0.0.1:{registry_port}",
            f"--metrics-addr=127.0.0.1:{metrics_port}",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{registry_port}/readyz", timeout=20)
        with urllib.request.urlopen(f"http://127.0.0.1:{registry_port}/v2/") as response:
            assert response.status == 200
            assert json.loads(response.read()) == {}
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            text = response.read().decode()
        assert 'mirror_store_up{store="cache"} 1.0' in text
        assert 'mirror_requests_total{kind="base",method="GET",source="none",status="200"}' in text
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    assert "using the node cache" in stderr
    assert (tmp_path / "cache" / "blobs").is_dir()


def test_keygen_prints_and_writes_a_key_once(tmp_path: Path) -> None:
    from mirror.clusterkey import ClusterKey

    printed = run_mirror("keygen")
    assert printed.returncode == 0
    ClusterKey.from_text(printed.stdout)
    target = tmp_path / "cluster.key"
    assert run_mirror("keygen", "--out", str(target)).returncode == 0
    assert target.stat().st_mode & 0o777 == 0o600
    ClusterKey.load(target)
    again = run_mirror("keygen", "--out", str(target))
    assert again.returncode == 1 and "not overwriting" in again.stderr
    assert again.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--bootstrap", "static:127.0.0.1:5001"], {}, "--bootstrap needs --cluster-key-file"),
        (["--cluster-key-file", "/nonexistent/key"], {}, "cannot read cluster key file"),
        (["--cluster-key-file", "raw"], {}, "raw bytes, not a key's base64 text"),
        ([], {"MIRROR_ALLOW_CLIENT": "10.0.0.0/8 bogus"}, "MIRROR_ALLOW_CLIENT: invalid CIDR"),
        (["--resolve-timeout", "soon"], {}, "invalid duration 'soon'"),
        (["--bootstrap", "carrier-pigeon:x", "--cluster-key-file", "k"], {}, "--bootstrap"),
    ],
)
def test_bad_routing_settings_are_one_line(
    args: list[str], env: dict[str, str], needle: str, tmp_path: Path
) -> None:
    (tmp_path / "k").write_text("x" * 43)
    (tmp_path / "raw").write_bytes(bytes(range(128, 160)))
    result = subprocess.run(
        [sys.executable, "-m", "mirror", "run", "--store=cache", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert needle in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_repeated_flags_replace_the_environment() -> None:
    environ = {"MIRROR_ALLOW_CLIENT": "10.0.0.0/8 192.168.0.0/16"}
    from_env = run_config(build_parser(environ).parse_args(["run"]))
    assert [str(n) for n in from_env.routing.allow_clients] == ["10.0.0.0/8", "192.168.0.0/16"]
    given = run_config(build_parser(environ).parse_args(["run", "--allow-client=172.16.0.0/12"]))
    assert [str(n) for n in given.routing.allow_clients] == ["172.16.0.0/12"]


@pytest.mark.parametrize(
    "command",
    [
        ["run"],
        ["keygen"],
        ["configure", "containerd"],
        ["configure", "docker"],
        ["cleanup", "docker"],
    ],
)
def test_help_works_for_every_command(command: list[str]) -> None:
    result = run_mirror(*command, "--help")
    assert result.returncode == 0 and "usage: mirror" in result.stdout, result.stderr
