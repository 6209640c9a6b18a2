#!/usr/bin/env python3
"""What this machine charges for memory: CPU seconds to write a GiB into new page-cache pages.

On a bare machine, writing a GiB into a new file (no fsync) costs a fraction of a CPU second.
Some virtual machines give memory they see unused back to their host (virtio free page
reporting, DAMON-based reclaim) and pay a fault on the host for every page touched again, so
the same write costs many times more once the recently freed pages are used up. That cost lands
on whichever process touches the memory (a runtime writing a layer, a mirror writing its cache
copy), and, on one machine simulating many nodes, grows with the number of nodes: they share
one pool of recently freed pages. The rollout benchmarks read differently on such a machine,
so this script measures it, next to them.

It writes `--files` files of `--mib` MiB one after the other into `--dir` (default: a new
directory under /var/tmp, removed at the end), each file kept until all are written, then
deletes the first and writes one more (which may reuse the pages just freed), and prints the
CPU seconds per GiB of each write.

Run: `.venv/bin/python bench/fresh_memory.py [--files 3] [--mib 1024]`. Results are in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

MIB = 1024 * 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_file(path: Path, mib: int, piece: bytes) -> tuple[float, float]:
    """Write `mib` MiB of `piece` into a new file; its wall and CPU seconds."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    with open(path, "wb", buffering=0) as file:
        for _ in range(mib):
            file.write(piece)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=3, help="files written and kept (3)")
    parser.add_argument("--mib", type=int, default=1024, help="size of each file in MiB (1024)")
    parser.add_argument("--dir", type=Path, default=None, help="where (a new dir in /var/tmp)")
    args = parser.parse_args()
    if args.files < 1 or args.mib < 1:
        parser.error("--files and --mib must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="fresh-memory-", dir=args.dir or "/var/tmp"))
    piece = os.urandom(MIB)
    gib = args.mib / 1024
    try:
        paths = [work / f"file{index}" for index in range(args.files + 1)]
        for index, path in enumerate(paths[:-1]):
            wall, cpu = write_file(path, args.mib, piece)
            print(
                f"file {index + 1} (new pages, {index * args.mib} MiB written before it kept): "
                f"{wall:.2f} s, {cpu / gib:.2f} CPU s/GiB",
                flush=True,
            )
        paths[0].unlink()
        wall, cpu = write_file(paths[-1], args.mib, piece)
        print(
            f"file {args.files + 1} (right after file 1 was deleted): "
            f"{wall:.2f} s, {cpu / gib:.2f} CPU s/GiB"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
