"""The prefetch file: what it pins, how each mistake is refused (line and reason), node labels,
and the watcher that keeps the last good pins while the file is broken.

The watcher is driven one poll at a time with `check()`: no test waits on a clock. Each write
sets an explicit mtime (`tick`), so a change is never hidden by a coarse filesystem clock.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from mirror.errors import ConfigError, PrefetchFileError
from mirror.oci.reference import parse_digest
from mirror.prefetch.model import ImageRef, Pin
from mirror.prefetch.pinfile import (
    MAX_FILE_BYTES,
    PinFileWatcher,
    load_pins,
    node_labels,
    parse_node_label,
    parse_pins,
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


def refs(pins: tuple[Pin, ...] | None) -> list[str]:
    assert pins is not None
    return [str(pin.ref) for pin in pins]


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelname == "ERROR"]


async def test_the_pins_at_start_then_nothing_until_a_change(tmp_path: Path) -> None:
    path = write(tmp_path / "p.toml", ALPINE, 1)
    watcher = PinFileWatcher(path, interval=0)
    assert refs(await watcher.check()) == ["docker.io/library/alpine:3.19"]
    assert await watcher.check() is None
    write(path, BOTH, 2)
    pins = await watcher.check()
    assert refs(pins) == ["docker.io/library/alpine:3.19", "docker.io/library/traefik:v2.10"]
    assert watcher.pins == pins and watcher.last_error is None
    assert await watcher.check() is None


async def test_an_empty_file_yields_no_pins_rather_than_nothing(tmp_path: Path) -> None:
    watcher = PinFileWatcher(write(tmp_path / "p.toml", "# none yet\n", 1))
    assert await watcher.check() == ()


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
    assert watcher.pins == good
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
    assert watcher.last_error is None and watcher.pins == good


async def test_a_broken_file_at_start_yields_nothing_until_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    path = write(tmp_path / "p.toml", BROKEN, 1)
    watcher = PinFileWatcher(path)
    assert await watcher.check() is None
    assert watcher.pins is None and watcher.last_error is not None
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
    assert watcher.pins == good and watcher.last_error is not None
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
