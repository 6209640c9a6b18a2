"""A real CNCF distribution registry (``docker-registry serve``) for end-to-end tests.

It plays the upstream registry the mirror must spare: its access log is how tests count
how often a blob really left the upstream.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from .net import free_port, wait_for_http
from .process import ManagedProcess

REGISTRY_BINARY = "docker-registry"

# Combined log format written by gorilla/handlers, one line per finished request:
# 127.0.0.1 - - [23/Nov/2026:08:03:38 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
_ACCESS_RE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<uri>\S+) [^"]*" (?P<status>\d{3}) '
)
_SYNC_PARAM = "harness-sync"


@dataclass(frozen=True)
class AccessEntry:
    """One parsed access-log line; ``path`` is the URI without its query string."""

    method: str
    uri: str
    status: int

    @property
    def path(self) -> str:
        return self.uri.split("?", 1)[0]


class Registry:
    """``docker-registry serve`` on 127.0.0.1 with filesystem storage under ``base_dir``.

    ``start()`` after ``stop()`` reuses the same port, storage and access log, so a test
    can take the upstream away and bring it back. ``extra_config`` is YAML text appended
    at top level (e.g. a ``proxy:`` or ``auth:`` section); it must not repeat a top-level
    key the base config already has (``version``, ``log``, ``storage``, ``http``).
    """

    def __init__(self, base_dir: Path, *, port: int | None = None, extra_config: str = "") -> None:
        self.base_dir = base_dir
        self.port = port or free_port()
        self.storage_dir = base_dir / "storage"
        self.config_path = base_dir / "config.yml"
        self.access_log_path = base_dir / "access.log"
        self.extra_config = extra_config
        base_dir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(exist_ok=True)
        self.config_path.write_text(self._config_text())
        self.process = ManagedProcess(
            [REGISTRY_BINARY, "serve", str(self.config_path)],
            base_dir,
            "registry",
            stdout_path=self.access_log_path,
        )

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the form used in image references and hosts.toml dirs."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        """The application log (stderr); the access log is separate."""
        return self.process.log_path

    def _config_text(self) -> str:
        # A fixed http.secret keeps upload sessions valid across restarts and silences a
        # warning about a random one.
        text = f"""\
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {self.storage_dir}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {self.host}
  secret: harness-not-a-secret
"""
        if self.extra_config:
            text += self.extra_config.rstrip("\n") + "\n"
        return text

    def start(self, timeout: float = 15.0) -> None:
        """Start and wait until ``/v2/`` answers (any status: with auth it is 401)."""
        self.process.start()
        deadline = time.monotonic() + timeout
        while True:
            self.process.ensure_running()
            try:
                wait_for_http(f"{self.url}/v2/", timeout=0.5)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(
                        f"registry on {self.host} not ready in {timeout}s; see {self.log_path}"
                    ) from None

    def stop(self) -> None:
        self.process.stop()

    @property
    def running(self) -> bool:
        return self.process.running

    def sync_access_log(self, timeout: float = 5.0) -> None:
        """Wait until every request answered so far has its access-log line.

        The registry logs a request after its handler returns, a moment after the client
        saw the response. A marker request sent now is answered (and logged) after the
        earlier ones, so once its line is in the file the earlier lines are too.
        """
        if not self.running:
            return
        marker = uuid.uuid4().hex
        try:
            with urllib.request.urlopen(f"{self.url}/v2/?{_SYNC_PARAM}={marker}", timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass  # 401 with auth enabled: still a logged request, which is all we need.
        deadline = time.monotonic() + timeout
        while marker not in self._read_raw():
            if time.monotonic() > deadline:
                raise TimeoutError(f"access-log marker {marker} never appeared")
            time.sleep(0.01)

    def _read_raw(self) -> str:
        if not self.access_log_path.exists():
            return ""
        return self.access_log_path.read_text(errors="replace")

    def access_log(self, *, sync: bool = True) -> list[str]:
        """The access-log lines so far (across restarts), without the harness's markers.

        Each contains the request line, e.g. ``"GET /v2/repo/blobs/sha256:... HTTP/1.1"``.
        """
        if sync:
            self.sync_access_log()
        return [
            line
            for line in self._read_raw().splitlines()
            if _ACCESS_RE.match(line) and _SYNC_PARAM not in line
        ]

    def requests(self, *, sync: bool = True) -> list[AccessEntry]:
        """The access log parsed into method, URI and status."""
        entries = []
        for line in self.access_log(sync=sync):
            match = _ACCESS_RE.match(line)
            assert match is not None
            entries.append(AccessEntry(match["method"], match["uri"], int(match["status"])))
        return entries

    def blob_fetch_count(self, digest: str, *, sync: bool = True) -> int:
        """How many ``GET /v2/<any repo>/blobs/<digest>`` requests reached the registry.

        Counts every GET whatever its status, so a fetch the registry answered with a
        redirect or error still counts as the client trying upstream. HEADs do not count.
        """
        suffix = f"/blobs/{digest}"
        return sum(
            1
            for entry in self.requests(sync=sync)
            if entry.method == "GET"
            and entry.path.startswith("/v2/")
            and entry.path.endswith(suffix)
        )

    def clear_access_log(self) -> None:
        """Forget earlier requests (e.g. the push that seeded the registry).

        Safe while running: the registry's stdout is opened in append mode.
        """
        self.sync_access_log()
        self.access_log_path.write_bytes(b"")

    def __enter__(self) -> Registry:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def notifications(url: str, token: str) -> str:
    """`extra_config` making the registry notify `url` of every push and pull, with the bearer
    token in the endpoint's headers (distribution's `notifications.endpoints`)."""
    return f"""\
notifications:
  endpoints:
    - name: mirror
      url: {url}
      headers:
        Authorization: [Bearer {token}]
      timeout: 1s
      threshold: 3
      backoff: 1s
"""
