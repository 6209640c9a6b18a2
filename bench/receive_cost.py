#!/usr/bin/env python3
"""The CPU a node spends receiving and hashing a peer's blob body: aiohttp vs a thread.

Two network namespaces joined by a bridge, both links shaped with `tc ... tbf` (`--rate`,
default 200mbit, as the rollout bench's capped runs): a sender that answers every GET with a
`Content-Length` and the blob by `sendfile` (as a holder does), and a receiver that reads the
body and hashes it with SHA-256, throwing the bytes away, in turns:

- aiohttp: the response's `content.iter_chunks()`, each piece hashed as it comes (what the peer
  fetcher did before `mirror/peers/receiver.py`; it hashed on a worker thread, at a little more
  CPU for the hand-offs);
- thread: the same request, then the project's `ThreadedBody` takes the connection over.

Each receive is its own process, so its CPU time (user + system, every thread) is its own.
Prints per round and the medians: MiB/s, CPU s/GiB, and thread/aiohttp. `--rate none` uses
loopback in this namespace instead (no shaping). As root:
`.venv/bin/python bench/receive_cost.py [--size-mib 256] [--rounds 3] [--rate 200mbit]`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import socket
import statistics
import sys
import threading
from pathlib import Path

from common import (
    REPO,
    Lab,
    LabNames,
    add_shaping_arguments,
    check_leftovers,
    check_subnet,
    in_ns,
    poll,
    run,
    run_benchmark,
    shape_egress,
    workspace,
)

MIB = 1024 * 1024
NAMES = LabNames(prefix="rcb", subnet="10.215.0", tmp_prefix="receive-cost-")
PORT = 8080
MODES = ("aiohttp", "thread")


def serve(blob: Path, address: str) -> None:
    """Answer every request on `address` with the blob (HTTP/1.1, Content-Length, sendfile)."""
    host, port = address.rsplit(":", 1)
    listener = socket.create_server((host, int(port)))
    size = blob.stat().st_size

    def answer(connection: socket.socket) -> None:
        with connection, blob.open("rb") as source:
            request = b""
            while b"\r\n\r\n" not in request:
                more = connection.recv(4096)
                if not more:
                    return
                request += more
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n"
            connection.sendall(head.encode())
            offset = 0
            while offset < size:
                offset += os.sendfile(connection.fileno(), source.fileno(), offset, size - offset)

    while True:
        connection, _ = listener.accept()
        threading.Thread(target=answer, args=(connection,), daemon=True).start()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def receive(url: str, mode: str) -> dict[str, object]:
    """GET `url`, hash the body one way or the other; seconds, CPU seconds, size, digest."""
    import aiohttp

    sys.path.insert(0, str(REPO))
    from mirror.peers.receiver import ThreadedBody

    digest = hashlib.sha256()
    size = 0
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        started, cpu = asyncio.get_running_loop().time(), cpu_seconds()
        async with session.get(url) as response:
            length = response.content_length or 0
            if mode == "thread":
                body = ThreadedBody(response, length, digest, stall_seconds=30)
                try:
                    async for piece in body:
                        size += len(piece)
                finally:
                    await body.aclose()
            else:
                async for chunk, _ in response.content.iter_chunks():
                    digest.update(chunk)
                    size += len(chunk)
        seconds = asyncio.get_running_loop().time() - started
        return {
            "seconds": seconds,
            "cpu": cpu_seconds() - cpu,
            "size": size,
            "digest": digest.hexdigest(),
        }


def measure(args: argparse.Namespace) -> int:
    with workspace(args.tmp_dir, NAMES.tmp_prefix) as work, Lab(NAMES) as lab:
        blob = work / "blob"
        with blob.open("wb") as out:
            for _ in range(args.size_mib):
                out.write(os.urandom(MIB))
        expected = hashlib.sha256(blob.read_bytes()).hexdigest()
        shaped = args.rate != "none"
        if shaped:
            lab.add_bridge()
            sender = lab.add_host("tx", f"{NAMES.subnet}.2")
            receiver = lab.add_host("rx", f"{NAMES.subnet}.3")
            for namespace in (sender, receiver):
                shape_egress(namespace, "eth0", args.rate, args.burst, args.latency)
            address = f"{NAMES.subnet}.2:{PORT}"
        else:
            sender = receiver = ""
            probe = socket.create_server(("127.0.0.1", 0))
            address = f"127.0.0.1:{probe.getsockname()[1]}"
            probe.close()
        me = str(Path(__file__).resolve())
        server_argv = [args.python, me, "serve", str(blob), address]
        lab.start(in_ns(sender, *server_argv) if shaped else server_argv, work, "sender")
        host, port = address.rsplit(":", 1)
        poll(lambda: _accepts(sender, host, int(port)), "the sender listening", 10)
        url = f"http://{address}/blob"
        where = f"links shaped to tbf rate {args.rate}" if shaped else "loopback"
        print(
            f"{args.size_mib} MiB, {where}; {args.rounds} rounds of {', '.join(MODES)}", flush=True
        )
        results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        for number in range(1, args.rounds + 1):
            line = []
            for mode in MODES:
                argv = [args.python, me, "receive", url, mode]
                done = run(*(in_ns(receiver, *argv) if shaped else argv), timeout=600)
                result = json.loads(done.stdout)
                if result["digest"] != expected or result["size"] != args.size_mib * MIB:
                    raise RuntimeError(f"{mode} received the wrong bytes: {result}")
                gib = result["size"] / 1024 / MIB
                row = {"rate": result["size"] / MIB / result["seconds"], "cpu": result["cpu"] / gib}
                results[mode].append(row)
                line.append(f"{mode} {row['rate']:.0f} MiB/s {row['cpu']:.2f} CPU s/GiB")
            print(f"round {number}: " + "; ".join(line), flush=True)
        medians = {
            mode: {key: statistics.median(r[key] for r in rows) for key in ("rate", "cpu")}
            for mode, rows in results.items()
        }
        for mode, median in medians.items():
            print(f"{mode:8} median {median['rate']:7.1f} MiB/s {median['cpu']:5.2f} CPU s/GiB")
        ratio = medians["thread"]["cpu"] / medians["aiohttp"]["cpu"]
        print(f"SUMMARY: CPU per GiB received, thread/aiohttp {ratio:.2f}")
    return 0


def _accepts(namespace: str, host: str, port: int) -> bool:
    probe = [sys.executable, "-c", f"import socket; socket.create_connection(('{host}', {port}))"]
    return run(*(in_ns(namespace, *probe) if namespace else probe), check=False).returncode == 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        serve(Path(argv[1]), argv[2])
        return 0
    if argv[:1] == ["receive"]:
        print(json.dumps(asyncio.run(receive(argv[1], argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="blob size (default: 256)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode (default: 3)")
    add_shaping_arguments(parser, rate="200mbit", burst="512kb", links="both links; none: loopback")
    parser.add_argument("--python", default=sys.executable, help="Python for both ends")
    parser.add_argument("--tmp-dir", default=None, help="parent of the temporary directory")
    parser.add_argument(
        "--clean-leftovers", action="store_true", help="remove an earlier run's namespaces"
    )
    args = parser.parse_args(argv)
    if args.rate != "none":
        if os.geteuid() != 0:
            parser.error("needs root for its namespaces (or --rate none)")
        check_leftovers(NAMES, Path(args.tmp_dir or "/tmp"), args.clean_leftovers)
        check_subnet(NAMES)
    return run_benchmark(measure, args)


if __name__ == "__main__":
    sys.exit(main())
