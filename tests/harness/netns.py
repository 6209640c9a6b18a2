"""A network namespace joined to the host by a veth pair: a client that is not on loopback.

Loopback is trusted by the mirror (it is the node's own runtime), so refusing outsiders can
only be shown from a real non-loopback address. The namespace and its link are made by the
test and removed at the end.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from dataclasses import dataclass


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@dataclass
class NetNamespace:
    name: str
    host_veth: str
    host_ip: str
    inner_ip: str

    def run_python(self, code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def http_status(self, url: str, headers: dict[str, str] | None = None) -> int:
        """GET `url` from inside the namespace; the HTTP status, or raise if none came back."""
        code = (
            "import urllib.request, urllib.error\n"
            f"req = urllib.request.Request({url!r}, headers={headers or {}!r})\n"
            "try:\n"
            "    print(urllib.request.urlopen(req, timeout=10).status)\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code)\n"
        )
        result = self.run_python(code)
        if result.returncode != 0:
            raise RuntimeError(f"request from {self.name} failed: {result.stderr}")
        return int(result.stdout.strip())

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


def make_namespace(subnet_octet: int = 231) -> NetNamespace:
    """A namespace at 10.<octet>.0.2 reaching the host at 10.<octet>.0.1 over a /30 veth link."""
    suffix = secrets.token_hex(3)
    name, host_veth, inner_veth = f"mtest-{suffix}", f"mh{suffix}", f"mn{suffix}"
    host_ip, inner_ip = f"10.{subnet_octet}.0.1", f"10.{subnet_octet}.0.2"
    namespace = NetNamespace(name, host_veth, host_ip, inner_ip)
    try:
        _ip("netns", "add", name)
        _ip("link", "add", host_veth, "type", "veth", "peer", "name", inner_veth)
        _ip("link", "set", inner_veth, "netns", name)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_veth)
        _ip("link", "set", host_veth, "up")
        _ip("-n", name, "addr", "add", f"{inner_ip}/30", "dev", inner_veth)
        _ip("-n", name, "link", "set", inner_veth, "up")
        _ip("-n", name, "link", "set", "lo", "up")
    except BaseException:
        namespace.remove()
        raise
    return namespace
