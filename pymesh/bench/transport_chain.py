"""The transport half of a swarm hop: a decode step's pushes through a chain of relays.

``python -m pymesh.bench.transport_chain [--transports quic,tcp] [--workers 1,2,3,5] [--tokens 300] [--json]``

Each relay is a process with an :class:`~pymesh.net.rpc.RpcNode` and nothing else: on a
``step`` push (a 576-float32 hidden state and a session's metadata, as a worker receives
``pm.step``) it pushes the step on to the next relay and a copy (``out``) to the client, as a
worker pushes ``pm.step`` and ``pm.out``. The client pushes a step to the first relay and waits
for the last relay's ``out``, token after token. Per transport and relay count N: ms/token
(median) and CPU ms/token of all processes together; ``per_hop_ms`` and ``cpu_per_hop_ms``
are the least-squares slopes against N, the transport's cost of one more hop (``pymesh bench
hops --echo`` adds the workers' and the client's own step path to this).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HIDDEN = 576
WARMUP = 30


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _relay(transport: str) -> None:
    import trio

    from pymesh.bench.transport import serve_ready
    from pymesh.net.rpc import Connection, RpcNode, TransportConfig
    from pymesh.proto.identity import Identity, PeerID

    async def main() -> None:
        links: dict[str, Connection] = {}
        async with RpcNode(Identity.generate(), transport=transport, config=TransportConfig()) as node, \
                trio.open_nursery() as nursery:
            async def setup(ctx: Any, meta: Any, tensors: Any) -> Any:
                links["client"] = ctx.connection
                if meta.get("port"):
                    peer = PeerID.from_text(bytes(meta["peer"]).decode())
                    links["next"] = await node.connect("127.0.0.1", int(meta["port"]), peer)
                return {}, []

            async def forward(meta: Any, tensors: Any) -> None:
                nxt = links.get("next")
                if nxt is not None:
                    await nxt.push("step", meta, tensors)
                await links["client"].push("out", dict(meta, final=int(nxt is None)), tensors)

            async def on_step(conn: Connection, meta: Any, tensors: Any) -> None:
                nursery.start_soon(forward, meta, tensors)

            node.register("setup", setup)
            node.on_push("step", on_step)
            await serve_ready(node)

    trio.run(main)


def _client(transport: str, relays: list[tuple[int, str, int]], tokens: int) -> tuple[float, float]:
    """(ms/token median, CPU ms/token of this process and the relays)."""
    import trio

    from pymesh.net.rpc import Connection, RpcNode, TransportConfig
    from pymesh.proto.frames import TensorBlob
    from pymesh.proto.identity import Identity, PeerID

    async def main() -> tuple[float, float]:
        done = [trio.Event()]
        async with RpcNode(Identity.generate(), transport=transport, config=TransportConfig()) as node:
            async def on_out(conn: Connection, meta: Any, tensors: Any) -> None:
                if meta["final"]:
                    done[0].set()

            node.on_push("out", on_out)
            conns = [await node.connect("127.0.0.1", port, PeerID.from_text(peer)) for port, peer, _ in relays]
            for i, conn in enumerate(conns):
                nxt = {"port": relays[i + 1][0], "peer": relays[i + 1][1]} if i + 1 < len(relays) else {}
                await conn.call("setup", nxt, timeout=30)
            blob = TensorBlob("float32", (1, 1, HIDDEN), memoryview(bytes(4 * HIDDEN)))
            samples: list[float] = []
            cpu0 = 0.0
            for k in range(WARMUP + tokens):
                if k == WARMUP:
                    cpu0 = time.process_time() + sum(_cpu_seconds(pid) for _, _, pid in relays)
                done[0] = trio.Event()
                t0 = time.perf_counter()
                await conns[0].push("step", {"sid": b"s" * 16, "step": k, "pos": k}, [blob])
                with trio.fail_after(30):
                    await done[0].wait()
                if k >= WARMUP:
                    samples.append(time.perf_counter() - t0)
            cpu1 = time.process_time() + sum(_cpu_seconds(pid) for _, _, pid in relays)
            return statistics.median(samples) * 1e3, (cpu1 - cpu0) / tokens * 1e3

    return trio.run(main)


def measure(transport: str, workers: int, tokens: int) -> dict[str, Any]:
    """One chain of ``workers`` relay processes; returns its point row."""
    procs: list[subprocess.Popen[str]] = []
    relays: list[tuple[int, str, int]] = []
    try:
        for _ in range(workers):
            p = subprocess.Popen([sys.executable, "-m", "pymesh.bench.transport_chain", "--relay", transport],
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout is not None
            ready = p.stdout.readline().split()
            if not ready or ready[0] != "READY":
                raise RuntimeError(f"relay for {transport} did not start (exit {p.poll()})")
            relays.append((int(ready[1]), ready[2], p.pid))
        ms, cpu_ms = _client(transport, relays, tokens)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return {"kind": "point", "transport": transport, "workers": workers,
            "ms_per_token_p50": round(ms, 3), "cpu_ms_per_token": round(cpu_ms, 3)}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys against xs (None with fewer than two distinct xs)."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den


def fit_row(transport: str, points: list[dict[str, Any]]) -> dict[str, Any]:
    xs = [float(p["workers"]) for p in points]
    per_hop = slope(xs, [p["ms_per_token_p50"] for p in points])
    cpu_per_hop = slope(xs, [p["cpu_ms_per_token"] for p in points])
    return {"kind": "fit", "transport": transport, "workers_fitted": [p["workers"] for p in points],
            "per_hop_ms": None if per_hop is None else round(per_hop, 3),
            "cpu_per_hop_ms": None if cpu_per_hop is None else round(cpu_per_hop, 3)}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m pymesh.bench.transport_chain", description=__doc__.split("\n")[0])
    p.add_argument("--transports", default="quic,tcp")
    p.add_argument("--workers", default="1,2,3,5", help="relay counts (default 1,2,3,5)")
    p.add_argument("--tokens", type=int, default=300, help="tokens timed per chain (default 300)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--relay", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.relay:
        _relay(a.relay)
        return
    rows: list[dict[str, Any]] = []
    for transport in a.transports.split(","):
        points = [measure(transport, int(n), a.tokens) for n in a.workers.split(",")]
        rows += [*points, fit_row(transport, points)]
    if a.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for row in rows:
            print(row)


if __name__ == "__main__":
    main(sys.argv[1:])
