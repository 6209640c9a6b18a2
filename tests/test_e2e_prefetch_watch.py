"""`mirror run --prefetch-from nomad`: a real node follows a Nomad-shaped jobs API.

Nomad cannot run here, so a local HTTP server answers the documented shapes of `GET /v1/jobs`
(blocking queries: held until the index moves or `wait` passes, `X-Nomad-Index`) and
`GET /v1/job/:id`; the watch itself is tested in depth in test_prefetch_watch.py. This test
proves the wiring: flags and `NOMAD_*` variables reach the watch, a job added pins its images
on the node (and the node takes them from upstream), a job removed unpins them.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from harness.cluster import wait_until
from harness.images import TestImages
from harness.mirror_node import MirrorNode, start_mirror
from harness.net import free_port
from harness.registry import Registry


class FakeNomad:
    """Jobs in a dict behind Nomad's jobs API, with blocking queries on the list."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.index = 1
        self.changed = threading.Condition()

    def put(self, job_id: str, image: str, datacenter: str = "dc1") -> None:
        with self.changed:
            self.index += 1
            self.jobs[job_id] = {
                "ID": job_id,
                "Namespace": "default",
                "Type": "service",
                "Datacenters": [datacenter],
                "NodePool": "default",
                "Status": "running",
                "Stop": False,
                "ModifyIndex": self.index,
                "TaskGroups": [
                    {
                        "Name": "g",
                        "Tasks": [{"Name": "t", "Driver": "docker", "Config": {"image": image}}],
                    }
                ],
            }
            self.changed.notify_all()

    def remove(self, job_id: str) -> None:
        with self.changed:
            self.index += 1
            del self.jobs[job_id]
            self.changed.notify_all()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        nomad = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                if url.path == "/v1/jobs":
                    with nomad.changed:
                        seen = int(query.get("index", "0"))
                        # Held until the index moves past the client's: a blocking query.
                        nomad.changed.wait_for(lambda: nomad.index > seen, timeout=10)
                        stubs = [
                            {k: v for k, v in job.items() if k != "TaskGroups"}
                            for job in nomad.jobs.values()
                        ]
                        self._answer(stubs, nomad.index)
                    return
                job = nomad.jobs.get(url.path.removeprefix("/v1/job/"))
                if job is None:
                    self.send_error(404)
                    return
                self._answer(job, nomad.index)

            def _answer(self, body: object, index: int) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Nomad-Index", str(index))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


@pytest.fixture
def nomad() -> Iterator[tuple[FakeNomad, str]]:
    fake = FakeNomad()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), fake.handler())
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    with fake.changed:
        fake.index += 1  # releases held queries
        fake.changed.notify_all()
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def pins(mirror: MirrorNode) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(f"{mirror.url}/mirror/v1/prefetch", timeout=10) as response:
        return {image["ref"]: image for image in json.loads(response.read())["images"]}


def test_nomad_jobs_pin_and_unpin_their_images(
    tmp_path: Path,
    nomad: tuple[FakeNomad, str],
    registry: Registry,
    test_images: TestImages,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, address = nomad
    image = test_images.docker_v2
    ref = image.push(registry.host, "team/web")
    monkeypatch.setenv("NOMAD_ADDR", address)  # read by `mirror run`, as a Nomad task's are
    mirror = start_mirror(
        tmp_path / "node",
        "--store=cache",
        "--prefetch-from=nomad",
        "--nomad-datacenter=dc1",
        f"--upstream={registry.host}={registry.url}",
    )
    try:

        def held() -> bool:
            return bool(pins(mirror).get(ref, {}).get("state") == "held")

        fake.put("web", ref)
        fake.put("elsewhere", f"{registry.host}/team/other:1", datacenter="dc2")
        wait_until(held, "the job's image to be held", 60)
        assert set(pins(mirror)) == {ref}
        assert pins(mirror)[ref]["origins"] == ["nomad"]
        assert registry.blob_fetch_count(image.layer_digests[0]) == 1

        fake.remove("web")
        wait_until(lambda: pins(mirror) == {}, "the removed job's image to be unpinned", 60)
    finally:
        mirror.stop()
    assert "Traceback" not in mirror.process.log_text()
