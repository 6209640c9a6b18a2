"""What the end-to-end tests do as an operator would: run `mirror` commands, compare trees."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path


def run_mirror_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m mirror ARGS` as an operator runs it; fails the test with its stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    result = subprocess.run(
        [sys.executable, "-m", "mirror", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, f"mirror {' '.join(args)}: {result.stderr}"
    return result


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every path under `root`: its bytes (regular files) and mode, to compare byte-exactly."""
    found: dict[str, tuple[bytes | None, int]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
        found[str(path.relative_to(root))] = (content, info.st_mode)
    return found
