"""A `mirror run` node process, started the way an operator would start it."""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .net import free_port
from .process import ManagedProcess


@dataclass
class MirrorNode:
    process: ManagedProcess
    host: str
    port: int
    metrics_port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def metrics_text(self) -> str:
        url = f"http://{self.host}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample, 0 when absent (counters start absent)."""
        wanted = {f'{key}="{value}"' for key, value in labels.items()}
        for line in self.metrics_text().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            found = set(head[len(name) :].strip("{}").split(",")) if "{" in head else set()
            if wanted <= found:
                return float(value)
        return 0.0

    def stop(self) -> None:
        self.process.stop()


def start_mirror(
    base_dir: Path, *args: str, host: str = "127.0.0.1", timeout: float = 20.0
) -> MirrorNode:
    """Start `python -m mirror run` on free ports and wait until /readyz answers 200."""
    port, metrics_port = free_port(host), free_port(host)
    argv = [
        sys.executable,
        "-m",
        "mirror",
        "run",
        f"--registry-addr={host}:{port}",
        f"--metrics-addr={host}:{metrics_port}",
        f"--cache-dir={base_dir / 'cache'}",
        "--log-level=debug",
        *args,
    ]
    process = ManagedProcess(argv, base_dir, "mirror")
    process.start()
    node = MirrorNode(process, host, port, metrics_port)
    deadline = time.monotonic() + timeout
    while True:
        process.ensure_running()
        try:
            with urllib.request.urlopen(f"{node.url}/readyz", timeout=1) as response:
                if response.status == 200:
                    return node
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            node.stop()
            raise TimeoutError(f"mirror on {node.address} not ready:\n{process.log_text()[-3000:]}")
        time.sleep(0.02)
