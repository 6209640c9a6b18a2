"""The pull API over real HTTP on loopback, backed by the node cache."""

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from mirror.content.service import ContentPolicy, ContentService
from mirror.metrics import Metrics
from mirror.oci import mediatypes as mt
from mirror.oci.reference import parse_digest, tag_ref
from mirror.registry.api import RegistryApi
from mirror.stores.cache import CacheStore


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Served:
    url: str
    http: ClientSession
    metrics: Metrics
    manifest: bytes
    blob: bytes


ALL_REGISTRIES = ContentPolicy(mirrored_registries=None, resolve_tags=True, tag_timeout=1.0)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with serving(tmp_path, ALL_REGISTRIES) as served:
        yield served


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, policy: ContentPolicy) -> AsyncIterator[Served]:
    """A node on its cache holding library/app:1.0 (docker.io) and org/app:2.0 (ghcr.io)."""
    store = CacheStore(tmp_path / "cache")
    await store.start()
    blob = bytes(range(256)) * 4096  # 1 MiB
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.DOCKER_MANIFEST,
            "config": {"digest": sha(b"{}"), "size": 2},
            "layers": [{"digest": sha(blob), "size": len(blob)}],
        }
    ).encode()
    for data in (blob, manifest, b"{}"):
        await store.put(parse_digest(sha(data)), data)
    await store.set_tag(tag_ref("docker.io", "library/app", "1.0"), parse_digest(sha(manifest)))
    await store.set_tag(tag_ref("ghcr.io", "org/app", "2.0"), parse_digest(sha(manifest)))
    metrics = Metrics()
    api = RegistryApi(metrics, ContentService(store, metrics, policy))
    server = TestServer(api.app(), host="127.0.0.1")
    await server.start_server()
    async with ClientSession() as http:
        yield Served(str(server.make_url("")).rstrip("/"), http, metrics, manifest, blob)
    await server.close()


async def error_code(response) -> str:
    body = await response.json()
    assert set(body) == {"errors"} and len(body["errors"]) == 1
    assert body["errors"][0]["message"]
    return body["errors"][0]["code"]


async def test_base_endpoint(served: Served) -> None:
    async with served.http.get(f"{served.url}/v2/") as response:
        assert response.status == 200
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_manifest_by_tag_and_digest(served: Served) -> None:
    digest = sha(served.manifest)
    for path in ("library/app/manifests/1.0", f"library/app/manifests/{digest}"):
        async with served.http.get(f"{served.url}/v2/{path}") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == mt.DOCKER_MANIFEST
            assert response.headers["Docker-Content-Digest"] == digest
            assert int(response.headers["Content-Length"]) == len(served.manifest)
            assert await response.read() == served.manifest


async def test_head_manifest_has_headers_and_no_body(served: Served) -> None:
    url = f"{served.url}/v2/org/app/manifests/2.0?ns=ghcr.io"
    async with served.http.head(url) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == sha(served.manifest)
        assert int(response.headers["Content-Length"]) == len(served.manifest)
        assert await response.read() == b""


async def test_tag_is_scoped_to_its_registry(served: Served) -> None:
    async with served.http.get(f"{served.url}/v2/org/app/manifests/2.0") as response:
        assert response.status == 404
        assert await error_code(response) == "MANIFEST_UNKNOWN"


async def test_blob_full_and_ranges(served: Served) -> None:
    url = f"{served.url}/v2/library/app/blobs/{sha(served.blob)}"
    async with served.http.get(url) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == sha(served.blob)
        assert response.headers["Accept-Ranges"] == "bytes"
        assert await response.read() == served.blob
    async with served.http.get(url, headers={"Range": "bytes=1000-1999"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1000-1999/{len(served.blob)}"
        assert await response.read() == served.blob[1000:2000]
    async with served.http.get(url, headers={"Range": "bytes=-10"}) as response:
        assert response.status == 206
        assert await response.read() == served.blob[-10:]
    async with served.http.get(url, headers={"Range": f"bytes={len(served.blob)}-"}) as response:
        assert response.status == 416
        assert response.headers["Content-Range"] == f"bytes */{len(served.blob)}"
        assert await error_code(response) == "RANGE_INVALID"
    async with served.http.head(url) as response:
        assert int(response.headers["Content-Length"]) == len(served.blob)
        assert await response.read() == b""


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", f"/v2/library/app/blobs/sha256:{'0' * 64}", 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/library/app/manifests/nope", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/library/app/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
        # An encoded slash makes it no pull endpoint at all.
        ("GET", "/v2/library/app/blobs/sha256:..%2F..%2Fetc%2Fpasswd", 404, "UNSUPPORTED"),
        ("GET", "/v2/library/app/blobs/sha256:..%2e%2e", 400, "DIGEST_INVALID"),
        ("GET", "/v2/Library/App/manifests/latest", 400, "NAME_INVALID"),
        ("GET", "/v2/library/app/manifests/latest?ns=bad%20host", 400, "NAME_INVALID"),
        ("GET", "/v2/_catalog", 404, "UNSUPPORTED"),
        ("PUT", "/v2/library/app/manifests/1.0", 405, "UNSUPPORTED"),
        ("DELETE", f"/v2/library/app/blobs/sha256:{'0' * 64}", 405, "UNSUPPORTED"),
        ("POST", "/v2/library/app/blobs/uploads/", 404, "UNSUPPORTED"),
        ("POST", "/v2/", 405, "UNSUPPORTED"),
    ],
)
async def test_errors_are_oci_json(
    served: Served, method: str, path: str, status: int, code: str
) -> None:
    async with served.http.request(method, served.url + path) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        assert await error_code(response) == code


async def test_tags_list_with_pagination(served: Served) -> None:
    store_url = f"{served.url}/v2/library/app/tags/list"
    async with served.http.get(store_url) as response:
        assert response.status == 200
        assert await response.json() == {"name": "library/app", "tags": ["1.0"]}
    async with served.http.get(f"{served.url}/v2/org/app/tags/list?ns=ghcr.io&n=0") as response:
        assert await response.json() == {"name": "org/app", "tags": []}
    async with served.http.get(
        f"{served.url}/v2/org/app/tags/list?ns=ghcr.io&last=2.0"
    ) as response:
        assert (await response.json())["tags"] == []
    for bad in ("x", "-1", "\u00b2", "1" * 5000):
        url = f"{served.url}/v2/org/app/tags/list?ns=ghcr.io&n={bad}"
        async with served.http.get(url) as response:
            assert response.status == 400
            assert await error_code(response) == "PAGINATION_NUMBER_INVALID"
    async with served.http.get(f"{served.url}/v2/org/nothing/tags/list") as response:
        assert response.status == 404
        assert await error_code(response) == "NAME_UNKNOWN"


async def test_tags_of_a_registry_that_is_not_mirrored_are_not_listed(tmp_path: Path) -> None:
    """--mirrored-registries holds for tag lists as for manifests (it once bypassed it)."""
    docker_only = ContentPolicy(
        mirrored_registries=frozenset({"docker.io"}), resolve_tags=True, tag_timeout=1.0
    )
    async with serving(tmp_path, docker_only) as served:
        async with served.http.get(f"{served.url}/v2/org/app/manifests/2.0?ns=ghcr.io") as response:
            assert response.status == 404
        async with served.http.get(f"{served.url}/v2/org/app/tags/list?ns=ghcr.io") as response:
            assert response.status == 404
            assert await error_code(response) == "NAME_UNKNOWN"
        async with served.http.get(f"{served.url}/v2/library/app/tags/list") as response:
            assert response.status == 200
            assert (await response.json())["tags"] == ["1.0"]


async def test_a_blob_that_is_not_a_manifest_is_not_served_as_one(served: Served) -> None:
    url = f"{served.url}/v2/library/app/manifests/{sha(served.blob)}"
    async with served.http.get(url) as response:
        assert response.status == 404
        assert await error_code(response) == "MANIFEST_UNKNOWN"


async def test_traversal_never_leaves_the_store(served: Served) -> None:
    for path in ("/v2/../../etc/passwd", "/v2/a/../../blobs/sha256:" + "0" * 64):
        async with served.http.get(served.url + path) as response:
            assert response.status in (400, 404)
            assert b"root:" not in await response.read()


async def test_health_and_readiness(served: Served) -> None:
    for path in ("/healthz", "/readyz"):
        async with served.http.get(served.url + path) as response:
            assert response.status == 200


async def test_requests_are_counted(served: Served) -> None:
    url = f"{served.url}/v2/library/app/blobs/{sha(served.blob)}"
    async with served.http.get(url) as response:
        await response.read()
    async with served.http.get(f"{served.url}/v2/library/app/manifests/nope") as response:
        await response.read()
    sample = served.metrics.registry.get_sample_value
    labels = {"method": "GET", "kind": "blob", "status": "200", "source": "local"}
    assert sample("mirror_requests_total", labels) == 1
    assert sample("mirror_served_bytes_total", {"kind": "blob", "source": "local"}) == len(
        served.blob
    )
    missing = {"method": "GET", "kind": "manifest", "status": "404", "source": "none"}
    assert sample("mirror_requests_total", missing) == 1
    duration = {"kind": "blob", "source": "local"}
    assert sample("mirror_request_duration_seconds_count", duration) == 1
