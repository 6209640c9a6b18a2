"""The prefetch file: what it pins and follows, how each mistake is refused (line and reason),
how follow patterns match, node labels, and the watcher that keeps the last good pins and
follows while the file is broken.

The watcher is driven one poll at a time with `check()`: no test waits on a clock. Each write
sets an explicit mtime (`tick`), so a change is never hidden by a coarse filesystem clock.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from mirror.errors import ConfigError, NameInvalid, PrefetchFileError
from mirror.oci.reference import parse_digest
from mirror.prefetch.follow import follow_matches, parse_follow_match
from mirror.prefetch.model import Follow, ImageRef, Pin, PrefetchFile, parse_image_ref
from mirror.prefetch.pinfile import (
    MAX_FILE_BYTES,
    PinFileWatcher,
    load_pins,
    load_prefetch_file,
    node_labels,
    parse_node_label,
    parse_pins,
    parse_prefetch_file,
)

HEX = "a" * 64
DIGEST = f"sha256:{HEX}"
LOGGER = "mirror.prefetch.pinfile"


def write(path: Path, text: str | bytes, tick: int) -> Path:
    """Write the file and give it mtime `tick` seconds, so successive writes always differ."""
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    os.utime(path, ns=(tick * 10**9, tick * 10**9))
    return path


def pins_of(text: str) -> tuple[Pin, ...]:
    return parse_pins(text, path="prefetch.toml")


def refused(text: str) -> PrefetchFileError:
    with pytest.raises(PrefetchFileError) as caught:
        pins_of(text)
    assert "\n" not in str(caught.value), "a reason is one line"
    return caught.value


# --- good files ---------------------------------------------------------------------------


def test_the_documented_entry() -> None:
    (pin,) = pins_of(
        """
[[image]]
ref = "registry.internal:5000/infra/traefik:v2.10"   # tag or digest
source = "docker.io/library/traefik:v2.10"           # optional: expected <- source
nodes = { role = "edge" }                            # optional: match on node labels
"""
    )
    assert pin == Pin(
        ImageRef("registry.internal:5000", "infra/traefik", "v2.10"),
        ImageRef("docker.io", "library/traefik", "v2.10"),
        {"role": "edge"},
        origin="file",
    )


def test_docker_hub_short_names_are_normalised() -> None:
    pins = pins_of(
        """
[[image]]
ref = "traefik:v2.10"
[[image]]
ref = "alpine"
[[image]]
ref = "bitnami/redis:7"
[[image]]
ref = "localhost:5000/app:1"
"""
    )
    assert [str(pin.ref) for pin in pins] == [
        "docker.io/library/traefik:v2.10",
        "docker.io/library/alpine:latest",
        "docker.io/bitnami/redis:7",
        "localhost:5000/app:1",
    ]
    assert all(pin.source is None and pin.nodes == {} and pin.origin == "file" for pin in pins)


def test_digest_refs_with_and_without_a_tag_and_a_source() -> None:
    digest_only, tagged = pins_of(
        f"""
[[image]]
ref = "registry.internal/app@{DIGEST}"
source = "ghcr.io/org/app:1.0"

[[image]]
ref = "registry.internal/app:1.0@{DIGEST}"
"""
    )
    assert digest_only.ref == ImageRef("registry.internal", "app", None, parse_digest(DIGEST))
    assert digest_only.source == ImageRef("ghcr.io", "org/app", "1.0")
    assert tagged.ref.tag == "1.0" and str(tagged.ref.digest) == DIGEST


def test_empty_and_comment_only_files_pin_nothing() -> None:
    assert pins_of("") == ()
    assert pins_of("# nothing pinned yet\n\n") == ()


def test_header_spellings_comments_and_sub_tables() -> None:
    pins = pins_of(
        """# edge images
  [[ image ]]   # the proxy
ref = "traefik:v2.10"

[["image"]]
ref = "alpine:3.19"
[image.nodes]
"node-role.kubernetes.io/edge" = ""
zone = "a"
"""
    )
    assert pins[1].nodes == {"node-role.kubernetes.io/edge": "", "zone": "a"}


def test_crlf_and_byte_order_mark(tmp_path: Path) -> None:
    path = write(tmp_path / "p.toml", b'\xef\xbb\xbf[[image]]\r\nref = "alpine:3.19"\r\n', 1)
    (pin,) = load_pins(path)
    assert str(pin.ref) == "docker.io/library/alpine:3.19"


def test_pins_apply_to_nodes_by_label() -> None:
    edge, anywhere, edge_a = pins_of(
        """
[[image]]
ref = "traefik:v2.10"
nodes = { role = "edge" }
[[image]]
ref = "alpine:3.19"
[[image]]
ref = "nginx:1"
nodes = { role = "edge", zone = "a" }
"""
    )
    edge_node = node_labels(["role=edge", "zone=b"])
    core_node = node_labels(["role=core"])
    assert edge.applies_to(edge_node) and not edge.applies_to(core_node)
    assert anywhere.applies_to(edge_node) and anywhere.applies_to({})
    assert not edge_a.applies_to(edge_node)
    assert edge_a.applies_to({"role": "edge", "zone": "a", "rack": "7"})


# --- refused files: the line of the entry and the reason ------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ('[[image]]\nref = "alpine"\nsource = \n', 3, "invalid TOML: Invalid value at column 10"),
        ('[[image]]\nref = "alpine"\nref = "nginx"\n', 3, "Cannot overwrite a value"),
        ('[[image]]\nref = "alpine"\n\nnodes = { role = "edge"\n', 4, "invalid TOML"),
        ('[[image]]\nref = """alpine\n\n', 2, "at the end of the file"),
    ],
)
def test_toml_syntax_errors_carry_tomllibs_line(text: str, line: int, reason: str) -> None:
    error = refused(text)
    assert error.line == line and reason in error.reason
    assert "(at line" not in error.reason, "the position is the error's line, not in the text"


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ('images = []\n[[image]]\nref = "a"\n', 1, "unknown key 'images'"),
        ('[[image]]\nref = "a"\n\n[settings]\nx = 1\n', 4, "unknown key 'settings'"),
        ('# c\n[[image]]\nref = "a"\n[[ "extra" ]]\n', 4, "unknown key 'extra'"),
        ('\nimage = "alpine"\n', 2, "image must be [[image]] tables, not a string"),
        ('\n[image]\nref = "alpine"\n', 2, "image must be [[image]] tables, not a table"),
        ("image = [1, 2]\n", 1, "image must be [[image]] tables, not an array"),
    ],
)
def test_unknown_or_misshapen_top_level_keys(text: str, line: int, reason: str) -> None:
    error = refused(text)
    assert error.line == line and reason in error.reason


TWO_GOOD = '[[image]]\nref = "alpine:3.19"\n\n# the proxy\n[[image]]\nref = "traefik:v2.10"\n\n'


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ('ref = "nginx"\nsrouce = "x"', "unknown key 'srouce' in [[image]] (expected ref, source"),
        ('source = "nginx"', "[[image]] has no ref"),
        ('ref = ""', "ref is empty"),
        ('ref = "  "', "ref is empty"),
        ("ref = 3", "ref must be a string, not an integer"),
        ('ref = ["nginx"]', "ref must be a string, not an array"),
        (
            'ref = "Nginx:1"',
            "ref 'Nginx:1' is not an image reference: invalid repository name 'library/Nginx'",
        ),
        ('ref = "nginx:bad tag"', "is not an image reference: invalid tag 'bad tag'"),
        ('ref = "nginx@sha256:abc"', "is not an image reference: sha256 digest must be 64"),
        ('ref = "nginx@md5:abc"', "unsupported digest algorithm 'md5'"),
        ('ref = "nginx"\nsource = ""', "source is empty"),
        ('ref = "nginx"\nsource = "a//b"', "source 'a//b' is not an image reference"),
        ('ref = "nginx"\nsource = true', "source must be a string, not a boolean"),
        ('ref = "nginx"\nnodes = "edge"', "nodes must be a table of label = value, not a string"),
        ('ref = "nginx"\nnodes = ["edge"]', "nodes must be a table of label = value, not an array"),
        ('ref = "nginx"\nnodes = { role = 1 }', "nodes: label 'role' must be a string, not an"),
        ('ref = "nginx"\nnodes = { role = { a = "b" } }', "must be a string, not a table"),
        ('ref = "nginx"\nnodes = { "" = "edge" }', "nodes: a label key is empty"),
        ('ref = "nginx"\nnodes = { "a=b" = "edge" }', "nodes: label key 'a=b' contains '='"),
        ('ref = "nginx"\nnodes = { role = "x=y" }', "nodes: label value 'x=y' contains '='"),
        ('ref = "nginx"\nnodes = { role = "ed ge" }', "label value 'ed ge' contains whitespace"),
        ('ref = "nginx"\nnodes = { role = "a\\nb" }', "label value 'a\\nb' contains whitespace"),
        ('ref = "nginx"\nnodes = { "r\\u0000" = "a" }', "label key 'r\\x00' contains whitespace"),
    ],
)
def test_a_bad_entry_is_refused_at_its_header_line(entry: str, reason: str) -> None:
    error = refused(f"{TWO_GOOD}  [[image]]  # third\n{entry}\n")
    assert error.line == 8, "the third entry's header"
    assert reason in error.reason
    assert str(error) == f"prefetch.toml:8: {error.reason}"


def test_a_source_with_a_digest_only_ref_is_fine() -> None:
    (pin,) = pins_of(f'[[image]]\nref = "app@{DIGEST}"\nsource = "app:1"\n')
    assert pin.ref.tag is None and pin.source is not None and pin.source.tag == "1"


def test_the_same_ref_twice_names_both_lines() -> None:
    error = refused(f'{TWO_GOOD}[[image]]\nref = "nginx"\n\n[[image]]\nref = "alpine:3.19"\n')
    assert error.line == 11
    assert error.reason == "ref 'docker.io/library/alpine:3.19' is pinned twice: lines 1 and 11"


def test_the_same_ref_twice_is_seen_through_normalisation() -> None:
    error = refused(
        '[[image]]\nref = "traefik:v2.10"\n[[image]]\nref = "docker.io/library/traefik:v2.10"\n'
    )
    assert error.line == 3 and "lines 1 and 3" in error.reason


def test_the_same_name_with_another_tag_or_digest_is_another_pin() -> None:
    pins = pins_of(
        f'[[image]]\nref = "app:1"\n[[image]]\nref = "app:2"\n[[image]]\nref = "app:1@{DIGEST}"\n'
    )
    assert len(pins) == 3


def test_without_trustworthy_headers_errors_name_the_entry_not_a_wrong_line() -> None:
    inline = refused('image = [{ ref = "alpine" }, { ref = "" }]\n')
    assert inline.line is None and inline.reason == "ref is empty"
    assert str(inline) == "prefetch.toml: ref is empty"
    twice = refused('image = [{ ref = "alpine" }, { ref = "alpine" }]\n')
    assert twice.line is None and "entries 1 and 2" in twice.reason
    # A header-looking line inside a multi-line string is not an entry: no line beats line 4.
    fooled = refused('[[image]]\nref = "alpine"\nsource = """\n[[image]]\n"""\n[[image]]\nref=1\n')
    assert fooled.line is None and fooled.reason.startswith("source '[[image]]\\n'")


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(PrefetchFileError) as caught:
        load_pins(path)
    assert caught.value.path == str(path) and caught.value.line is None
    assert caught.value.reason == "cannot read the file: No such file or directory"


def test_a_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(PrefetchFileError, match="cannot read the file: Is a directory"):
        load_pins(tmp_path)


def test_a_file_that_is_not_utf8_names_the_line_of_the_bad_byte(tmp_path: Path) -> None:
    path = write(tmp_path / "p.toml", b'[[image]]\nref = "alpine"\n# caf\xe9\n', 1)
    with pytest.raises(PrefetchFileError) as caught:
        load_pins(path)
    assert caught.value.line == 3
    assert caught.value.reason == "not UTF-8: byte 0xe9 at offset 30"


def test_a_file_over_the_cap_is_refused_unread(tmp_path: Path) -> None:
    at_cap = write(tmp_path / "cap.toml", b"#" * MAX_FILE_BYTES, 1)
    assert load_pins(at_cap) == ()
    over = write(tmp_path / "big.toml", b"#" * (MAX_FILE_BYTES + 1), 1)
    with pytest.raises(PrefetchFileError, match="larger than 1048576 bytes"):
        load_pins(over)


def test_a_prefetch_file_error_is_a_config_error() -> None:
    assert isinstance(refused("x = 1\n"), ConfigError)


# --- node labels --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pair"),
    [
        ("role=edge", ("role", "edge")),
        ("topology.kubernetes.io/zone=eu-1a", ("topology.kubernetes.io/zone", "eu-1a")),
        ("node-role.kubernetes.io/edge=", ("node-role.kubernetes.io/edge", "")),
    ],
)
def test_node_labels_parse(text: str, pair: tuple[str, str]) -> None:
    assert parse_node_label(text) == pair


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("role", "node label 'role' is not KEY=VALUE"),
        ("", "node label '' is not KEY=VALUE"),
        ("=edge", "node label '=edge': a label key is empty"),
        ("role=a=b", "node label 'role=a=b': label value 'a=b' contains '='"),
        ("role =edge", "label key 'role ' contains whitespace or unprintable characters"),
        ("role=ed\tge", "label value 'ed\\tge' contains whitespace"),
        ("role=\x1b[31m", "label value '\\x1b[31m' contains whitespace or unprintable"),
    ],
)
def test_node_label_errors(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_node_label(text)
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_node_labels_from_text_and_pairs() -> None:
    assert node_labels(["role=edge", ("zone", "a")]) == {"role": "edge", "zone": "a"}
    assert node_labels([]) == {}


def test_a_node_label_given_twice_is_refused_naming_both() -> None:
    with pytest.raises(ConfigError) as caught:
        node_labels(["role=edge", "zone=a", "role=core"])
    assert str(caught.value) == "node label 'role' is given twice: role=edge and role=core"
    with pytest.raises(ConfigError, match="given twice: role=edge and role=edge"):
        node_labels(["role=edge", ("role", "edge")])


# --- the watcher --------------------------------------------------------------------------

ALPINE = '[[image]]\nref = "alpine:3.19"\n'
BOTH = ALPINE + '[[image]]\nref = "traefik:v2.10"\nnodes = { role = "edge" }\n'
BROKEN = ALPINE + '[[image]]\nref = "Traefik"\n'


def refs(found: PrefetchFile | None) -> list[str]:
    assert found is not None
    return [str(pin.ref) for pin in found.pins]


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelname == "ERROR"]


async def test_the_pins_at_start_then_nothing_until_a_change(tmp_path: Path) -> None:
    path = write(tmp_path / "p.toml", ALPINE, 1)
    watcher = PinFileWatcher(path, interval=0)
    assert refs(await watcher.check()) == ["docker.io/library/alpine:3.19"]
    assert await watcher.check() is None
    write(path, BOTH, 2)
    found = await watcher.check()
    assert refs(found) == ["docker.io/library/alpine:3.19", "docker.io/library/traefik:v2.10"]
    assert found is not None and watcher.file == found and watcher.pins == found.pins
    assert watcher.last_error is None
    assert await watcher.check() is None


async def test_an_empty_file_yields_no_pins_rather_than_nothing(tmp_path: Path) -> None:
    watcher = PinFileWatcher(write(tmp_path / "p.toml", "# none yet\n", 1))
    assert await watcher.check() == PrefetchFile()


async def test_a_touch_or_the_same_bytes_rewritten_yield_nothing(tmp_path: Path) -> None:
    path = write(tmp_path / "p.toml", ALPINE, 1)
    watcher = PinFileWatcher(path)
    assert await watcher.check() is not None
    os.utime(path, ns=(5 * 10**9, 5 * 10**9))
    assert await watcher.check() is None
    write(path, ALPINE, 6)
    assert await watcher.check() is None


async def test_a_change_that_leaves_the_pins_as_they_were_yields_nothing(tmp_path: Path) -> None:
    path = write(tmp_path / "p.toml", ALPINE, 1)
    watcher = PinFileWatcher(path)
    assert await watcher.check() is not None
    write(
        path, "# reviewed\n" + ALPINE.replace('"alpine:3.19"', '"docker.io/library/alpine:3.19"'), 2
    )
    assert await watcher.check() is None


async def test_a_broken_file_keeps_the_previous_pins_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    path = write(tmp_path / "p.toml", ALPINE, 1)
    watcher = PinFileWatcher(path)
    good = await watcher.check()
    write(path, BROKEN, 2)
    assert await watcher.check() is None
    assert watcher.file == good
    assert watcher.last_error is not None
    assert watcher.last_error.startswith(f"{path}:3: ref 'Traefik' is not an image reference")
    assert errors_logged(caplog) == [f"{watcher.last_error}; keeping the previous 1 pins"]
    os.utime(path, ns=(3 * 10**9, 3 * 10**9))
    assert await watcher.check() is None and await watcher.check() is None
    assert len(errors_logged(caplog)) == 1, "the same broken content is logged once"

    write(path, BOTH, 4)
    assert refs(await watcher.check()) == [
        "docker.io/library/alpine:3.19",
        "docker.io/library/traefik:v2.10",
    ]
    assert watcher.last_error is None


async def test_a_broken_file_put_back_as_it_was_clears_the_error_and_yields_nothing(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "p.toml", ALPINE, 1)
    watcher = PinFileWatcher(path)
    good = await watcher.check()
    write(path, "[[image]\n", 2)
    assert await watcher.check() is None
    assert (
        watcher.last_error
        == f"{path}:1: invalid TOML: Expected ']]' at the end of an array declaration at column 8"
    )
    write(path, ALPINE, 3)
    assert await watcher.check() is None
    assert watcher.last_error is None and watcher.file == good


async def test_a_broken_file_at_start_yields_nothing_until_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    path = write(tmp_path / "p.toml", BROKEN, 1)
    watcher = PinFileWatcher(path)
    assert await watcher.check() is None
    assert watcher.file is None and watcher.pins is None and watcher.last_error is not None
    assert errors_logged(caplog) == [
        f"{watcher.last_error}; no pins from this file until it is fixed"
    ]
    write(path, ALPINE, 2)
    assert refs(await watcher.check()) == ["docker.io/library/alpine:3.19"]
    assert watcher.last_error is None


async def test_a_missing_file_is_an_error_once_until_it_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    path = tmp_path / "p.toml"
    watcher = PinFileWatcher(path)
    assert await watcher.check() is None and await watcher.check() is None
    assert watcher.last_error == f"{path}: cannot read the file: No such file or directory"
    assert len(errors_logged(caplog)) == 1
    write(path, ALPINE, 1)
    assert refs(await watcher.check()) == ["docker.io/library/alpine:3.19"]
    assert watcher.last_error is None


async def test_a_deleted_file_keeps_the_pins_and_its_return_yields_only_if_changed(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "p.toml", ALPINE, 1)
    watcher = PinFileWatcher(path)
    good = await watcher.check()
    path.unlink()
    assert await watcher.check() is None
    assert watcher.file == good and watcher.last_error is not None
    write(path, ALPINE, 2)
    assert await watcher.check() is None and watcher.last_error is None
    write(path, BOTH, 3)
    assert len(refs(await watcher.check())) == 2


def configmap(mount: Path, version: str, text: str, tick: int) -> None:
    """Publish `text` as kubelet updates a ConfigMap volume: a new timestamped directory, then
    an atomic rename of the `..data` symlink onto it, then the old directory removed."""
    directory = mount / f"..{version}"
    directory.mkdir()
    write(directory / "prefetch.toml", text, tick)
    staging = mount / "..data_tmp"
    staging.symlink_to(directory.name)
    previous = (mount / "..data").resolve() if (mount / "..data").exists() else None
    os.replace(staging, mount / "..data")
    if not (mount / "prefetch.toml").is_symlink():
        (mount / "prefetch.toml").symlink_to("..data/prefetch.toml")
    if previous is not None:
        (previous / "prefetch.toml").unlink()
        previous.rmdir()


async def test_a_configmap_symlink_swap_is_seen(tmp_path: Path) -> None:
    configmap(tmp_path, "2024_01_01", ALPINE, 1)
    watcher = PinFileWatcher(tmp_path / "prefetch.toml")
    assert refs(await watcher.check()) == ["docker.io/library/alpine:3.19"]
    configmap(tmp_path, "2024_01_02", BOTH, 2)
    assert len(refs(await watcher.check())) == 2
    assert await watcher.check() is None


async def test_a_configmap_swap_to_a_file_with_the_same_stat_is_seen(tmp_path: Path) -> None:
    """Same size, same mtime, maybe a recycled inode: only the resolved path tells them apart."""
    configmap(tmp_path, "2024_01_01", ALPINE, 1)
    watcher = PinFileWatcher(tmp_path / "prefetch.toml")
    await watcher.check()
    other = ALPINE.replace("3.19", "3.20")
    assert len(other) == len(ALPINE)
    configmap(tmp_path, "2024_01_02", other, 1)
    assert refs(await watcher.check()) == ["docker.io/library/alpine:3.20"]


async def test_changes_yields_the_pins_at_start(tmp_path: Path) -> None:
    watcher = PinFileWatcher(write(tmp_path / "p.toml", ALPINE, 1), interval=0)
    changes = watcher.changes()
    try:
        assert refs(await anext(changes)) == ["docker.io/library/alpine:3.19"]
    finally:
        await changes.aclose()


# --- [[follow]] ---------------------------------------------------------------------------


def file_of(text: str) -> PrefetchFile:
    return parse_prefetch_file(text, path="prefetch.toml")


def refused_file(text: str) -> PrefetchFileError:
    with pytest.raises(PrefetchFileError) as caught:
        file_of(text)
    assert "\n" not in str(caught.value), "a reason is one line"
    return caught.value


def test_the_documented_follow() -> None:
    found = file_of(
        """
[[follow]]
match = "registry.example.com:5000/team/*:prod-*"   # glob over registry/repository:tag
nodes = { tier = "web" }                           # optional

[[follow]]
match = "ghcr.io/org/app:v*"
poll = "30s"                                       # optional duration: poll upstream
keep = 5                                           # optional: tags kept pinned per repository
"""
    )
    assert found == PrefetchFile(
        pins=(),
        follows=(
            Follow("registry.example.com:5000/team/*:prod-*", {"tier": "web"}, keep=3),
            Follow("ghcr.io/org/app:v*", {}, 30.0, keep=5),
        ),
    )


def test_polling_a_repository_glob_is_refused_with_the_reason() -> None:
    error = refused_file(
        '[[follow]]\nmatch = "registry.example.com:5000/team/*:prod-*"\npoll = "30s"\n'
    )
    assert error.line == 1
    assert error.reason == (
        "poll lists one repository's tags, so the registry and repository must be literal "
        "('team/*' has a wildcard); without poll the follow takes push events only"
    )


def test_images_and_follows_in_one_file(tmp_path: Path) -> None:
    text = (
        ALPINE
        + '\n[[follow]]\nmatch = "ghcr.io/org/app:v*"\n'
        + '[[follow]]\nmatch = "ghcr.io/org/app:v*"\nnodes = { tier = "api" }\npoll = "5m"\n'
    )
    found = load_prefetch_file(write(tmp_path / "p.toml", text, 1))
    assert refs(found) == ["docker.io/library/alpine:3.19"]
    assert found.follows == (
        Follow("ghcr.io/org/app:v*"),
        Follow("ghcr.io/org/app:v*", {"tier": "api"}, 300.0),
    )
    # The pins-only readers still read such a file, and give its pins.
    assert load_pins(tmp_path / "p.toml") == found.pins == parse_pins(text, path="p")


@pytest.mark.parametrize(
    ("match", "normalised"),
    [
        ("docker.io/nginx:1.*", "docker.io/library/nginx:1.*"),
        ("docker.io/*:latest", "docker.io/library/*:latest"),
        ("docker.io/bitnami/*:*", "docker.io/bitnami/*:*"),
        ("  ghcr.io/org/app:v?  ", "ghcr.io/org/app:v?"),
        ("localhost:5000/app:*", "localhost:5000/app:*"),
        ("*/team/app:prod-*", "*/team/app:prod-*"),
        ("*.example.com:*/team/app:*", "*.example.com:*/team/app:*"),
        ("[::1]:5000/app:*", "[::1]:5000/app:*"),
    ],
)
def test_follow_matches_are_normalised(match: str, normalised: str) -> None:
    (follow,) = file_of(f'[[follow]]\nmatch = "{match}"\n').follows
    assert follow.match == normalised
    assert str(parse_follow_match(match)) == normalised


@pytest.mark.parametrize(
    ("poll", "seconds"), [("5s", 5.0), ("90s", 90.0), ("5m", 300.0), ("1h", 3600.0)]
)
def test_poll_durations(poll: str, seconds: float) -> None:
    (follow,) = file_of(f'[[follow]]\nmatch = "reg.io/app:*"\npoll = "{poll}"\n').follows
    assert follow.poll == seconds


GOOD_THEN = ALPINE + '\n[[follow]]\nmatch = "reg.io/app:*"\n\n[[follow]]  # third\n'


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (
            'matc = "reg.io/app:*"',
            "unknown key 'matc' in [[follow]] (expected match, nodes, poll, keep)",
        ),
        ('nodes = { tier = "web" }', "[[follow]] has no match"),
        ("match = 3", "match must be a string, not an integer"),
        ('match = ""', "match is empty"),
        ('match = "team/app:*"', "'team' is not a registry host: the pattern starts with the"),
        ('match = "reg io/app:*"', "'reg io' is not a registry host"),
        ('match = "reg.io/app"', "has no :tag (write :* for every tag)"),
        ('match = "reg.io"', "it has no repository"),
        ('match = "reg.io/"', "it has no repository"),
        (f'match = "reg.io/app:v1@{DIGEST}"', "a follow takes tags, not digests"),
        ('match = "reg.io/App:*"', "invalid repository 'App'"),
        ('match = "reg.io//app:*"', "invalid repository '/app'"),
        ('match = "reg.io/team/:*"', "invalid repository 'team/'"),
        ('match = "reg.io/app:bad tag*"', "invalid tag 'bad tag*'"),
        ('match = "reg.io/app:"', "the tag is empty"),
        ('match = "re_g*/app:*"', "invalid registry 're_g*'"),
        ('match = "reg.io/app:*"\npoll = 30', 'poll must be a duration such as "30s" or "5m", not'),
        ('match = "reg.io/app:*"\npoll = "soon"', "poll: 'soon' is not a duration"),
        ('match = "reg.io/app:*"\npoll = "0s"', "must be positive"),
        ('match = "reg.io/app:*"\npoll = "4s"', "poll '4s' is below the minimum of 5s"),
        ('match = "reg.io/app:*"\npoll = "500ms"', "below the minimum of 5s"),
        ('match = "*/app:*"\npoll = "30s"', "registry and repository must be literal ('*' has a"),
        ('match = "reg.io/team/*:*"\npoll = "30s"', "('team/*' has a wildcard)"),
        ('match = "reg.io/app?:*"\npoll = "30s"', "('app?' has a wildcard)"),
        ('match = "reg.io/app:*"\nnodes = "web"', "nodes must be a table of label = value"),
        (
            'match = "reg.io/app:*"\nkeep = 0',
            "keep must be at least 1 (the tag just pushed), not 0",
        ),
        ('match = "reg.io/app:*"\nkeep = "3"', "keep must be a whole number of tags, not"),
        (
            'match = "reg.io/app:*"\nkeep = true',
            "keep must be a whole number of tags, not a boolean",
        ),
        ('match = "reg.io/app:*"\nkeep = 2.5', "keep must be a whole number of tags, not"),
        ('match = "reg.io/app:*"\nnodes = { "a=b" = "c" }', "nodes: label key 'a=b' contains '='"),
    ],
)
def test_a_bad_follow_is_refused_at_its_header_line(entry: str, reason: str) -> None:
    error = refused_file(f"{GOOD_THEN}{entry}\n")
    assert error.line == 7, "the third entry's header"
    assert reason in error.reason
    assert str(error) == f"prefetch.toml:7: {error.reason}"


def test_a_wildcard_without_poll_is_fine() -> None:
    (follow,) = file_of('[[follow]]\nmatch = "*/team/*:*"\n').follows
    assert follow.poll is None


def test_the_same_follow_twice_names_both_lines() -> None:
    error = refused_file(
        '[[follow]]\nmatch = "docker.io/nginx:*"\nnodes = { a = "1", b = "2" }\n\n'
        '[[follow]]\nmatch = "docker.io/library/nginx:*"\nnodes = { b = "2", a = "1" }\n'
    )
    assert error.line == 5
    assert error.reason == "match 'docker.io/library/nginx:*' is followed twice: lines 1 and 5"


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ('\nfollow = "x"\n', 2, "follow must be [[follow]] tables, not a string"),
        ("[follow]\nmatch = 'reg.io/a:*'\n", 1, "follow must be [[follow]] tables, not a table"),
        ("[[follows]]\n", 1, "unknown key 'follows' (the file holds [[image]] and [[follow]]"),
    ],
)
def test_misshapen_follow_tables(text: str, line: int, reason: str) -> None:
    error = refused_file(text)
    assert error.line == line and reason in error.reason


def test_inline_follows_are_refused_without_a_wrong_line() -> None:
    error = refused_file('follow = [{ match = "reg.io/a:*" }, { match = "" }]\n')
    assert error.line is None and error.reason == "match is empty"


# --- matching -----------------------------------------------------------------------------


def ref(text: str) -> ImageRef:
    return parse_image_ref(text)


@pytest.mark.parametrize(
    ("match", "text", "expected"),
    [
        (
            "registry.example.com:5000/team/*:prod-*",
            "registry.example.com:5000/team/app:prod-1",
            True,
        ),
        (
            "registry.example.com:5000/team/*:prod-*",
            "registry.example.com:5000/team/app:prod-",
            True,
        ),
        (
            "registry.example.com:5000/team/*:prod-*",
            "REGISTRY.example.com:5000/team/app:prod-1",
            True,
        ),
        (
            "registry.example.com:5000/team/*:prod-*",
            "registry.example.com:5000/team/app:staging",
            False,
        ),
        (
            "registry.example.com:5000/team/*:prod-*",
            "registry.example.com:5000/team/app/debug:prod-1",
            False,
        ),
        (
            "registry.example.com:5000/team/*:prod-*",
            "registry.example.com:5001/team/app:prod-1",
            False,
        ),
        (
            "registry.example.com:5000/team/*:prod-*",
            "registry.example.com:5000/other/app:prod-1",
            False,
        ),
        (
            "registry.example.com:5000/team/*/*:*",
            "registry.example.com:5000/team/app/debug:x",
            True,
        ),
        ("reg.io/app*:v?", "reg.io/app:v1", True),
        ("reg.io/app*:v?", "reg.io/app-web:v2", True),
        ("reg.io/app*:v?", "reg.io/app:v10", False),
        ("reg.io/app*:v?", "reg.io/app:v", False),
        ("reg.io/a.b:v1.0", "reg.io/a.b:v1.0", True),
        ("reg.io/a.b:v1.0", "reg.io/a-b:v1x0", False),
        ("*/team/app:*", "127.0.0.1:5000/team/app:v1", True),
        ("*/team/app:*", "ghcr.io/team/app:latest", True),
        ("*/team/app:*", "ghcr.io/team/app2:latest", False),
        ("*.example.com/app:*", "reg.example.com/app:1", True),
        ("*.example.com/app:*", "example.com/app:1", False),
        ("[::1]:5000/app:v?", "[::1]:5000/app:v1", True),
        ("docker.io/nginx:1.*", "nginx:1.27", True),
        ("docker.io/nginx:1.*", "docker.io/library/nginx:1.27", True),
        ("docker.io/nginx:1.*", "nginx:2", False),
        ("docker.io/*:latest", "alpine", True),
        ("docker.io/*:latest", "bitnami/redis:latest", False),
        ("reg.io/app:*", f"reg.io/app:v1@{DIGEST}", True),
        ("reg.io/app:*", f"reg.io/app@{DIGEST}", False),
    ],
)
def test_follow_matches(match: str, text: str, expected: bool) -> None:
    (follow,) = file_of(f'[[follow]]\nmatch = "{match}"\n').follows
    assert follow_matches(follow, ref(text)) is expected


def test_a_follow_that_is_no_pattern_raises_rather_than_matching_nothing() -> None:
    with pytest.raises(NameInvalid, match="is not a registry/repository:tag pattern"):
        follow_matches(Follow("nginx:*"), ref("nginx:1"))


def test_a_pattern_is_pollable_when_registry_and_repository_are_literal() -> None:
    assert parse_follow_match("reg.io:5000/team/app:prod-*").pollable
    assert not parse_follow_match("*/team/app:*").pollable
    assert not parse_follow_match("reg.io/team/*:v1").pollable
    pattern = parse_follow_match("reg.io/team/app:prod-*")
    assert pattern.matches_tag("prod-1") and not pattern.matches_tag("dev-1")


# --- the watcher and follows --------------------------------------------------------------

FOLLOW_WEB = '\n[[follow]]\nmatch = "reg.io/app:prod-*"\nnodes = { tier = "web" }\n'


async def test_a_change_of_follows_alone_is_a_change(tmp_path: Path) -> None:
    path = write(tmp_path / "p.toml", ALPINE, 1)
    watcher = PinFileWatcher(path)
    first = await watcher.check()
    assert first is not None and first.follows == ()
    write(path, ALPINE + FOLLOW_WEB, 2)
    second = await watcher.check()
    assert second is not None and second.pins == first.pins
    assert second.follows == (Follow("reg.io/app:prod-*", {"tier": "web"}),)
    write(path, "# same\n" + ALPINE + FOLLOW_WEB, 3)
    assert await watcher.check() is None


async def test_a_broken_file_keeps_the_previous_follows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    path = write(tmp_path / "p.toml", ALPINE + FOLLOW_WEB, 1)
    watcher = PinFileWatcher(path)
    good = await watcher.check()
    write(path, ALPINE + FOLLOW_WEB.replace("reg.io/", ""), 2)
    assert await watcher.check() is None
    assert watcher.file == good
    assert watcher.last_error == (
        f"{path}:4: match 'app:prod-*' is not a registry/repository:tag pattern: it has no "
        "repository"
    )
    assert errors_logged(caplog) == [
        f"{watcher.last_error}; keeping the previous 1 pins and 1 follows"
    ]


async def test_changes_yields_the_follows_too(tmp_path: Path) -> None:
    watcher = PinFileWatcher(write(tmp_path / "p.toml", FOLLOW_WEB, 1), interval=0)
    changes = watcher.changes()
    try:
        found = await anext(changes)
        assert found.pins == () and len(found.follows) == 1
    finally:
        await changes.aclose()
