"""The reference docs say exactly what the code does: every flag, every metric."""

from __future__ import annotations

import importlib.machinery
import re
import subprocess
import sys
import types
from pathlib import Path

from mirror.cli import flag_reference
from mirror.metrics import Metrics

DOCS = Path(__file__).resolve().parent.parent / "docs"
_ROW_FLAG = re.compile(
    r"^\| `(--[a-z0-9-]+)`(?: \(repeatable\))? \| `(MIRROR_[A-Z0-9_]+)` \|", re.M
)


def documented_flags(command: str) -> dict[str, str]:
    """flag -> environment variable, from the section of `mirror <command>`."""
    text = (DOCS / "configuration.md").read_text()
    section = text.split(f"## `mirror {command}`", 1)[1].split("\n## ", 1)[0]
    return dict(_ROW_FLAG.findall(section))


def help_flags(*command: str) -> set[str]:
    """The flags `mirror <command> --help` prints (the real parser, not its data)."""
    out = subprocess.run(
        [sys.executable, "-m", "mirror", *command, "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return set(re.findall(r"^\s+(--[a-z0-9-]+)", out, re.M)) - {"--help"}


def test_the_reference_lists_exactly_the_flags_of_mirror_run() -> None:
    documented = documented_flags("run")
    assert set(documented) == help_flags("run")
    for flag, env in documented.items():
        assert env == "MIRROR_" + flag[2:].replace("-", "_").upper()


def test_every_command_is_documented_with_its_flags() -> None:
    for command, flags in flag_reference().items():
        documented = documented_flags(command)
        assert set(documented) == {doc.flag for doc in flags}, command
        assert set(documented) == help_flags(*command.split()), command


def test_the_metrics_reference_lists_exactly_the_metrics() -> None:
    text = (DOCS / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(mirror_[a-z_]+)` \|", text, re.M))
    real = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in Metrics().registry.collect()
    }
    assert documented == real


def test_the_generated_files_are_current() -> None:
    """What the generator would write is what is there (run scripts/gen-reference-docs)."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "gen-reference-docs"
    loader = importlib.machinery.SourceFileLoader("gen_reference_docs", str(script))
    generator = types.ModuleType(loader.name)
    loader.exec_module(generator)
    assert (DOCS / "configuration.md").read_text() == generator.render_configuration()
    assert (DOCS / "metrics.md").read_text() == generator.render_metrics()
