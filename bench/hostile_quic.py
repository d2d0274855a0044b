"""QUIC Initial flood: how fast an endpoint discards garbage Initials, and what a flood at
several times that rate does to an honest client's connect time (issue 11, item 3).

    .venv/bin/python bench/hostile_quic.py [--multipliers 3,5] [--connects 15] [--sources 1]

1. Discard rate: garbage Initials (valid v1 header, random payload) pushed through the
   endpoint's routing and admission in-process, each reaching the decrypt check (the
   per-source budget disabled): what one spoofed-source packet costs.
2. A server process (``--serve``), an honest client here connecting ``--connects`` times
   (fresh identity and connection each, QUIC + identity handshake), unflooded.
3. The same while a flooder process (``--flood``) sends garbage Initials from 127.0.0.2
   (or ``--sources`` addresses 127.0.1.x) at each multiple of the discard rate.

Prints one JSON line per measurement and the ratio of flooded to unflooded median connect
time (the issue's goal: <= 3x). Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pymesh.net.config import TransportConfig  # noqa: E402
from pymesh.net.quic_admission import InitialGate  # noqa: E402
from pymesh.net.rpc import CallContext, RpcNode  # noqa: E402
from pymesh.proto.frames import Meta, TensorBlob  # noqa: E402
from pymesh.proto.identity import Identity, PeerID  # noqa: E402
from tests.net.test_initial_flood import garbage_initial  # noqa: E402  (the tests' flood packets)


async def _echo(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
    return meta, tensors


def discard_rate(n: int = 20000) -> float:
    """Garbage Initials per second through routing + admission, each decrypt-checked."""
    async def main() -> float:
        async with RpcNode(Identity.generate(), transport="quic") as node:
            await node.listen("127.0.0.1", 0)
            ep = node._endpoint
            assert ep is not None
            ep.gate = InitialGate(source_rate=1e9, source_burst=1e9)
            packets = [garbage_initial() for _ in range(2048)]
            t0 = time.perf_counter()
            for i in range(n):
                assert ep._route_untrusted(packets[i % len(packets)], ("127.0.0.2", 4433)) is None
            elapsed = time.perf_counter() - t0
            assert ep.gate.pending == 0 and ep.gate.counters["undecryptable"] == n
            return n / elapsed
    return trio.run(main)


async def _serve(port_file: str) -> None:
    async with RpcNode(Identity.generate(), transport="quic", config=TransportConfig()) as node:
        node.register("echo", _echo)
        port = await node.listen("127.0.0.1", 0)
        print(f"READY {port} {node.peer_id}", flush=True)
        ep = node._endpoint
        assert ep is not None
        while True:
            await trio.sleep(1)
            Path(port_file).write_text(json.dumps({"pending": ep.gate.pending, **ep.gate.counters}))


def _flood(port: int, rate: float, seconds: float, sources: int) -> None:
    socks = []
    for i in range(sources):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.2" if sources == 1 else f"127.0.1.{1 + i % 250}", 0))
        socks.append(s)
    packets = [garbage_initial() for _ in range(4096)]
    dest = ("127.0.0.1", port)
    t0 = time.monotonic()
    sent = 0
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        due = int((now - t0) * rate) - sent
        for _ in range(min(due, 2000)):
            try:
                socks[sent % sources].sendto(packets[sent % 4096], dest)
            except OSError:
                pass
            sent += 1
        if due <= 0:
            time.sleep(0.0005)
    print(json.dumps({"flood_sent": sent, "flood_rate": round(sent / seconds)}), flush=True)


async def _connect_times(port: int, peer: PeerID, count: int) -> list[float]:
    times = []
    for _ in range(count):
        async with RpcNode(Identity.generate(), transport="quic") as client:
            t0 = time.perf_counter()
            with trio.fail_after(30):
                conn = await client.connect("127.0.0.1", port, peer)
            times.append(time.perf_counter() - t0)
            await conn.call("echo", {}, timeout=10)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--multipliers", default="3,5")
    p.add_argument("--connects", type=int, default=15)
    p.add_argument("--sources", type=int, default=1)
    p.add_argument("--serve", metavar="STATS_FILE")
    p.add_argument("--flood", nargs=3, metavar=("PORT", "RATE", "SECONDS"))
    args = p.parse_args()
    if args.serve:
        trio.run(_serve, args.serve)
        return
    if args.flood:
        _flood(int(args.flood[0]), float(args.flood[1]), float(args.flood[2]), args.sources)
        return

    rate = discard_rate()
    print(json.dumps({"discard_rate_per_s": round(rate)}), flush=True)
    stats_file = f"/tmp/hostile_quic_{os.getpid()}.json"
    server = subprocess.Popen([sys.executable, __file__, "--serve", stats_file], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        ready = server.stdout.readline().split()
        port, peer = int(ready[1]), PeerID.from_text(ready[2])
        base = trio.run(_connect_times, port, peer, args.connects)
        base_med = statistics.median(base)
        print(json.dumps({"flood": 0, "connect_median_ms": round(base_med * 1000, 2)}), flush=True)
        for k in (float(m) for m in args.multipliers.split(",")):
            seconds = 3.0 + args.connects * 1.0
            flooder = subprocess.Popen([sys.executable, __file__, "--flood", str(port), str(k * rate), str(seconds),
                                        "--sources", str(args.sources)])
            time.sleep(1.0)
            try:
                got = trio.run(_connect_times, port, peer, args.connects)
            finally:
                flooder.wait(seconds + 30)
            med = statistics.median(got)
            stats = json.loads(Path(stats_file).read_text()) if Path(stats_file).exists() else {}
            print(json.dumps({"flood_x_discard_rate": k, "flood_rate_per_s": round(k * rate),
                              "sources": args.sources, "connect_median_ms": round(med * 1000, 2),
                              "connect_max_ms": round(max(got) * 1000, 2), "ratio": round(med / base_med, 2),
                              "server": stats}), flush=True)
    finally:
        server.kill()
        server.wait()
        Path(stats_file).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
