"""A small real cluster with something to show: for the status page test and its screenshot.

Three `mirror run` nodes on their node caches (127.0.0.11-13, one cluster key, static
bootstrap) in front of a real distribution registry holding the test images. Node 0 pulls two
images from upstream; node 1 pulls the first of them (from node 0, a peer) and a third image
(from upstream), and keeps that one pinned. Node 1's page then has peers, holdings, recent
pulls from both sources, upstream health and a pin to show, and the second image (`multi`,
held by node 0 only) is there to measure: its pull through node 1 comes from a peer.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cluster import HOSTS, keygen, wait_until
from .images import OCI_INDEX, TestImage, TestImages
from .mirror_node import MirrorNode
from .net import free_udp_port
from .registry import Registry

MirrorStarter = Callable[..., MirrorNode]
_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


@dataclass
class StatusDemo:
    nodes: list[MirrorNode]
    registry: Registry
    app: str  # pulled by node 0 from upstream, then by node 1 from node 0
    multi: str  # an index, pulled by node 0 from upstream only: node 1 measures it
    pinned: str  # pulled by node 1 from upstream, and pinned there

    def page_url(self, index: int = 1) -> str:
        node = self.nodes[index]
        return f"http://{node.host}:{node.metrics_port}/"


def start_status_demo(
    base: Path, start: MirrorStarter, registry: Registry, images: TestImages
) -> StatusDemo:
    """Push, start the nodes, pull and pin; every step waited for, not slept on."""
    app = images.multi_layer.push_as(registry.host, "demo/app", "v1")
    multi = images.index.push_as(registry.host, "demo/multi", "v2")
    pinned = images.docker_v2.push_as(registry.host, "demo/legacy", "v3")
    key_file = base / "cluster.key"
    keygen(key_file)
    routers = [f"{host}:{free_udp_port(host)}" for host in HOSTS[:3]]
    nodes = [
        start(
            "--store=cache",
            f"--cluster-key-file={key_file}",
            f"--router-addr={router}",
            f"--bootstrap=static:{','.join(routers)}",
            "--resolve-timeout=200ms",
            f"--upstream={registry.host}={registry.url}",
            host=host,
        )
        for host, router in zip(HOSTS[:3], routers, strict=True)
    ]
    for node in nodes:
        wait_until(lambda n=node: n.metric("mirror_dht_contacts") >= 2, f"{node.address} peers")
    pull(nodes[0], registry.host, "demo/app", "v1", images.multi_layer)
    pull(nodes[0], registry.host, "demo/multi", "v2", images.index)
    # Node 0 announces what it holds once it is in its cache: then node 1 finds it there.
    wanted = 2 + len(images.multi_layer.layer_digests) + 3 + len(images.index.layer_digests)
    wait_until(
        lambda: (
            nodes[0].metric("mirror_advertised_keys", kind="digest") >= wanted
            and nodes[0].metric("mirror_advertised_keys", kind="tag") >= 2
        ),
        "node 0 to announce the images",
    )
    pull(nodes[1], registry.host, "demo/app", "v1", images.multi_layer)
    pull(nodes[1], registry.host, "demo/legacy", "v3", images.docker_v2)
    pin(nodes[1], pinned)
    return StatusDemo(nodes, registry, app, multi, pinned)


def pull(node: MirrorNode, registry: str, repository: str, tag: str, image: TestImage) -> None:
    """What a runtime's pull asks of the node: the manifest by tag (and this platform's, for
    an index), then the config and every layer, each read whole and checked for size."""
    ns = urllib.parse.quote(registry, safe="")
    base = f"{node.url}/v2/{repository}"
    get(f"{base}/manifests/{tag}?ns={ns}")
    if image.media_type == OCI_INDEX:
        get(f"{base}/manifests/{image.host_manifest_digest}?ns={ns}")
    for digest in [image.config_digest, *image.layer_digests]:
        body = get(f"{base}/blobs/{digest}?ns={ns}")
        assert len(body) == image.host_blobs[digest], digest


def pin(node: MirrorNode, ref: str) -> None:
    """`mirror prefetch` by hand: pin `ref` on the node and wait until it is held."""
    request = urllib.request.Request(
        f"{node.url}/mirror/v1/prefetch",
        data=json.dumps({"ref": ref}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 202
    query = urllib.parse.urlencode({"ref": ref})

    def held() -> bool:
        state = json.loads(get(f"{node.url}/mirror/v1/prefetch?{query}"))["state"]
        assert state != "failed", state
        return bool(state == "held")

    wait_until(held, f"{ref} to be held on {node.address}", timeout=60)


# In the page: measure `ref` with its form, then the result table's rows (tab-separated cells)
# and the note under the form, once the table has its total (or the note an error).
MEASURE_SCRIPT = """
new Promise(resolve => {
  const rows = document.getElementById("measure-result");
  const note = document.getElementById("measure-note");
  const answer = () => ({rows: [...rows.rows].map(row => row.innerText), note: note.textContent});
  new MutationObserver(() => {
    if (rows.textContent.includes("total") || note.className === "error") resolve(answer());
  }).observe(document.body, {subtree: true, childList: true, characterData: true,
                             attributes: true});
  document.getElementById("measure-ref").value = REF;
  document.getElementById("measure-button").click();
})
"""


def measure_script(ref: str) -> str:
    """`MEASURE_SCRIPT` for `ref`, to run in the page (`DevToolsPage.run`)."""
    return MEASURE_SCRIPT.replace("REF", json.dumps(ref))


def get(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": _ACCEPT})
    with urllib.request.urlopen(request, timeout=60) as response:
        body: bytes = response.read()
        return body
