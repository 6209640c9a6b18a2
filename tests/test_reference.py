"""The distribution spec's grammar: what is accepted, and that bad input is a typed 400 error."""

import pytest

from mirror.errors import DigestInvalid, EndpointUnknown, NameInvalid
from mirror.oci.reference import (
    is_registry,
    parse_digest,
    parse_image_name,
    registry_as_path_component,
    registry_from_path_component,
    tag_ref,
)
from mirror.registry.paths import parse_target
from mirror.request import Kind

HEX = "a" * 64


@pytest.mark.parametrize(
    "name",
    ["library/alpine", "a", "org/team/app", "a.b_c__d---e/f0", "x" * 200],
)
def test_valid_repository_names(name: str) -> None:
    assert parse_target(f"{name}/blobs/sha256:{HEX}", None).repository == name


@pytest.mark.parametrize(
    "name",
    ["Library/alpine", "a//b", "-a", "a-", "a/../b", "..", "a/.b", "a_", "a___b", "x" * 256, ".."],
)
def test_invalid_repository_names(name: str) -> None:
    with pytest.raises(NameInvalid):
        parse_target(f"{name}/manifests/latest", None)


@pytest.mark.parametrize(
    "digest",
    [f"sha256:{HEX[:-1]}", f"sha256:{HEX.upper()}", "sha256:../../etc/passwd", "md5:abc", "nope"],
)
def test_invalid_digests(digest: str) -> None:
    with pytest.raises(DigestInvalid):
        parse_digest(digest)


def test_sha512_digest_is_accepted() -> None:
    assert parse_digest("sha512:" + "b" * 128).algorithm == "sha512"


def test_target_defaults_to_docker_hub_and_takes_ns() -> None:
    hub = parse_target("library/alpine/manifests/3.19", None)
    assert hub.kind is Kind.MANIFEST and str(hub.tag) == "docker.io/library/alpine:3.19"
    ghcr = parse_target("org/app/manifests/1.0", "ghcr.io")
    assert str(ghcr.tag) == "ghcr.io/org/app:1.0"
    local = parse_target("org/app/manifests/1.0", "127.0.0.1:5000")
    assert local.registry == "127.0.0.1:5000"
    by_digest = parse_target(f"org/app/manifests/sha256:{HEX}", None)
    assert by_digest.tag is None and str(by_digest.digest) == f"sha256:{HEX}"


def test_repository_may_contain_api_words() -> None:
    target = parse_target(f"a/blobs/manifests/blobs/sha256:{HEX}", None)
    assert target.kind is Kind.BLOB and target.repository == "a/blobs/manifests"


@pytest.mark.parametrize("ns", ["bad host", "a/b", "x:port", "-x.io"])
def test_invalid_ns(ns: str) -> None:
    with pytest.raises(NameInvalid):
        parse_target("a/manifests/latest", ns)


@pytest.mark.parametrize("path", ["_catalog", "a/tags/lists", "a/blobs/uploads/", "a/manifests/"])
def test_unknown_endpoints(path: str) -> None:
    with pytest.raises(EndpointUnknown):
        parse_target(path, None)


def test_tags_list_target() -> None:
    target = parse_target("org/app/tags/list", "ghcr.io")
    assert target.kind is Kind.TAGS and target.repository == "org/app"


def test_invalid_tag() -> None:
    with pytest.raises(NameInvalid):
        parse_target("a/manifests/.hidden", None)
    with pytest.raises(NameInvalid):
        parse_target("a/manifests/" + "t" * 129, None)


def test_parse_image_name() -> None:
    assert parse_image_name("docker.io/library/alpine:3.19") == tag_ref(
        "docker.io", "library/alpine", "3.19"
    )
    assert parse_image_name("127.0.0.1:5000/a/b:1") == tag_ref("127.0.0.1:5000", "a/b", "1")
    assert parse_image_name(f"docker.io/library/alpine@sha256:{HEX}") is None
    assert parse_image_name("alpine") is None
    assert parse_image_name("127.0.0.1:5000/a") is None


@pytest.mark.parametrize(
    ("path", "registry", "repository"),
    [
        ("ghcr.io/org/app/manifests/1.0", "ghcr.io", "org/app"),
        ("localhost:5000/app/blobs/sha256:" + HEX, "localhost:5000", "app"),
        ("localhost/team/app/manifests/1", "localhost", "team/app"),
        ("127.0.0.1:5000/a/b/manifests/1", "127.0.0.1:5000", "a/b"),
        # Not host names: Docker Hub namespaces.
        ("library/alpine/manifests/3", "docker.io", "library/alpine"),
        ("org/app/manifests/1", "docker.io", "org/app"),
    ],
)
def test_registry_in_the_first_path_component(path: str, registry: str, repository: str) -> None:
    target = parse_target(path, None)
    assert (target.registry, target.repository) == (registry, repository)


def test_ns_wins_over_a_dotted_first_component() -> None:
    target = parse_target("my.org/app/manifests/1", "ghcr.io")
    assert (target.registry, target.repository) == ("ghcr.io", "my.org/app")


@pytest.mark.parametrize(
    ("host", "valid"),
    [
        ("localhost:65535", True),
        ("localhost:1", True),
        ("[::1]:5000", True),
        ("[fd00::12]", True),
        # Would only fail later, when a URL is made of them: refused with the name.
        ("localhost:99999", False),
        ("localhost:0", False),
        ("[:::::]", False),
        ("[1.2.3.4]", False),
    ],
)
def test_registry_ports_and_addresses(host: str, valid: bool) -> None:
    assert is_registry(host) is valid
    if not valid:
        with pytest.raises(NameInvalid):
            parse_target("a/manifests/x", host)


@pytest.mark.parametrize(
    ("registry", "component"),
    [
        ("registry.internal:5000", "registry.internal_5000"),
        ("127.0.0.1:5000", "127.0.0.1_5000"),
        ("registry:5000", "registry_5000"),
        ("localhost:5000", "localhost_5000"),
        ("ghcr.io", "ghcr.io"),
        ("localhost", "localhost"),
        ("registry", None),  # a single word would read as a Docker Hub namespace
        ("[::1]:5000", None),  # Docker cannot spell it
        ("Registry.io", None),  # nor capitals
    ],
)
def test_a_registry_is_spelled_as_a_path_component_docker_accepts(
    registry: str, component: str | None
) -> None:
    assert registry_as_path_component(registry) == component
    if component is not None:
        assert registry_from_path_component(component) == registry


@pytest.mark.parametrize("component", ["library", "myorg", "foo_bar", "host_99999", "a_b_1"])
def test_a_docker_hub_namespace_is_not_read_as_a_registry(component: str) -> None:
    assert registry_from_path_component(component) is None
