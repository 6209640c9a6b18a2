import json

import pytest

from mirror.oci import mediatypes as mt


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"mediaType": mt.DOCKER_MANIFEST, "layers": [], "config": {}}, mt.DOCKER_MANIFEST),
        ({"mediaType": mt.DOCKER_MANIFEST_LIST, "manifests": []}, mt.DOCKER_MANIFEST_LIST),
        ({"mediaType": mt.OCI_INDEX, "manifests": []}, mt.OCI_INDEX),
        ({"schemaVersion": 2, "manifests": []}, mt.OCI_INDEX),
        ({"schemaVersion": 2, "config": {}, "layers": []}, mt.OCI_MANIFEST),
        ({"mediaType": "application/vnd.oci.image.config.v1+json"}, None),
        ({"architecture": "amd64", "rootfs": {}}, None),
        ([1, 2], None),
    ],
)
def test_detect(document: object, expected: str | None) -> None:
    assert mt.detect_manifest_type(json.dumps(document).encode()) == expected


def test_binary_is_not_a_manifest() -> None:
    assert mt.detect_manifest_type(b"\x1f\x8b\x08\x00binary") is None


def test_referenced_digests_config_first() -> None:
    body = json.dumps(
        {"config": {"digest": "c"}, "layers": [{"digest": "l1"}, {"digest": "l2"}]}
    ).encode()
    assert mt.referenced_digests(body) == ["c", "l1", "l2"]
    assert mt.referenced_digests(b'{"manifests":[{"digest":"m"}]}') == ["m"]
