#!/usr/bin/env python3
"""The ceiling of relaying a verified blob on this host, with no HTTP and no event loop.

`bench/peer_throughput.py` measures a node passing on a blob it streams from a peer. This asks how
fast any Python relay could go on this machine, with the same three parties (holder, relay,
client) sharing its CPUs. The relays are plain blocking sockets on loopback, each on its own
threads:

- direct: the holder sends the blob with `os.sendfile` straight to the client (the baseline);
- relay, no hash: the relay `recv_into`s a 1 MiB buffer and `sendall`s it on (no verification);
- relay, hash inline: the same, SHA-256 over each buffer between receiving and sending;
- relay, hash pipelined: the same, the hash on a second thread over a ring of three buffers.

The client receives into a buffer and discards. Each mode runs `--rounds` times over a
`--size-mib` random blob; the medians and their ratios to direct are printed. Run:
`.venv/bin/python bench/relay_ceiling.py [--size-mib 1024] [--rounds 3]`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

MIB = 1024 * 1024
Relay = Callable[[socket.socket, socket.socket, int], None]


def serve_once(handler: Callable[[socket.socket], None]) -> tuple[str, int]:
    """Listen on a free loopback port; the first connection goes to `handler` on a thread."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        with listener:
            connection, _ = listener.accept()
            with connection:
                handler(connection)

    threading.Thread(target=accept, daemon=True).start()
    host, port = listener.getsockname()[:2]
    return host, port


def holder(blob: Path) -> Callable[[socket.socket], None]:
    def send(connection: socket.socket) -> None:
        size = blob.stat().st_size
        with blob.open("rb") as source:
            offset = 0
            while offset < size:
                offset += os.sendfile(connection.fileno(), source.fileno(), offset, size - offset)

    return send


def relay_plain(upstream: socket.socket, client: socket.socket, size: int) -> None:
    view = memoryview(bytearray(MIB))
    moved = 0
    while moved < size and (count := upstream.recv_into(view)):
        client.sendall(view[:count])
        moved += count


def relay_hash_inline(upstream: socket.socket, client: socket.socket, size: int) -> None:
    digest = hashlib.sha256()
    view = memoryview(bytearray(MIB))
    moved = 0
    while moved < size and (count := upstream.recv_into(view)):
        digest.update(view[:count])
        client.sendall(view[:count])
        moved += count


def relay_hash_pipelined(upstream: socket.socket, client: socket.socket, size: int) -> None:
    digest = hashlib.sha256()
    free: queue.Queue[bytearray] = queue.Queue()
    filled: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    for _ in range(3):
        free.put(bytearray(MIB))

    def hash_filled() -> None:
        while (item := filled.get()) is not None:
            buffer, count = item
            digest.update(memoryview(buffer)[:count])
            free.put(buffer)

    hasher = threading.Thread(target=hash_filled)
    hasher.start()
    moved = 0
    try:
        while moved < size:
            buffer = free.get()
            view = memoryview(buffer)
            count = upstream.recv_into(view)
            if not count:
                break
            client.sendall(view[:count])
            filled.put((buffer, count))
            moved += count
    finally:
        filled.put(None)
        hasher.join()


def relaying(address: tuple[str, int], relay: Relay, size: int) -> tuple[str, int]:
    def forward(client: socket.socket) -> None:
        with socket.create_connection(address) as upstream:
            relay(upstream, client, size)

    return serve_once(forward)


def receive(address: tuple[str, int], size: int) -> float:
    """MiB/s the client received the whole blob at."""
    view = memoryview(bytearray(MIB))
    got = 0
    with socket.create_connection(address) as connection:
        started = time.perf_counter()
        while count := connection.recv_into(view):
            got += count
        elapsed = time.perf_counter() - started
    if got != size:
        raise RuntimeError(f"received {got} bytes of {size}")
    return got / elapsed / MIB


MODES: dict[str, Relay | None] = {
    "direct": None,
    "relay, no hash": relay_plain,
    "relay, hash inline": relay_hash_inline,
    "relay, hash pipelined": relay_hash_pipelined,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="blob size (default: 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each mode (default: 3)")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.rounds < 1:
        parser.error("--size-mib and --rounds must be at least 1")
    size = args.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="mirror-relay-") as work:
        blob = Path(work) / "blob"
        with blob.open("wb") as out:
            for _ in range(args.size_mib):
                out.write(os.urandom(MIB))
        speeds: dict[str, list[float]] = {mode: [] for mode in MODES}
        for round_number in range(1, args.rounds + 1):
            shown = []
            for mode, relay in MODES.items():
                address = serve_once(holder(blob))
                if relay is not None:
                    address = relaying(address, relay, size)
                speeds[mode].append(receive(address, size))
                shown.append(f"{mode} {speeds[mode][-1]:.0f}")
            print(f"round {round_number}: " + ", ".join(shown) + " MiB/s", flush=True)
    direct = statistics.median(speeds["direct"])
    print(f"\n{'mode':<24}{'median MiB/s':>14}{'ratio to direct':>17}")
    for mode, values in speeds.items():
        median = statistics.median(values)
        print(f"{mode:<24}{median:>14.0f}{median / direct:>17.2f}")
    print(f"{os.cpu_count()} CPUs; {args.rounds} x {args.size_mib} MiB over loopback")
    return 0


if __name__ == "__main__":
    sys.exit(main())
