"""Client half of the WAN test: echo payloads byte-exact, then time bulk one-way sends.

    python -m tests.net.wan_client --transport quic --host 10.77.0.2 --port P --peer ID

Prints one JSON object: {"echo_ok": [...sizes...], "mb_per_s": float, "seconds": float}.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import trio

from pymesh.proto.frames import TensorBlob
from pymesh.net.rpc import RpcNode, TransportConfig
from pymesh.proto.identity import Identity, PeerID

SIZES = (0, 1000, 8192, 65536, 262144)


async def run(a: argparse.Namespace) -> dict[str, object]:
    cfg = TransportConfig(packet_size=a.packet_size, idle_timeout=20, connect_timeout=15,
                          congestion_control=a.cc)
    out: dict[str, object] = {}
    start = time.monotonic()
    async with RpcNode(Identity.generate(), transport=a.transport, config=cfg) as node:
        conn = await node.connect(a.host, a.port, PeerID.from_text(a.peer))
        ok = []
        for n in SIZES:
            data = os.urandom(n)
            _, got = await conn.call("echo", {"n": n}, [TensorBlob("uint8", (n,), memoryview(data))], timeout=30)
            if bytes(got[0].data) != data:
                raise SystemExit(f"echo of {n} bytes came back different")
            ok.append(n)
        out["echo_ok"] = ok
        bulk = TensorBlob("uint8", (a.bulk_bytes,), memoryview(bytearray(a.bulk_bytes)))

        async def sender(n: int) -> None:
            for _ in range(n):
                meta, _ = await conn.call("sink", {}, [bulk], timeout=60)
                assert meta["bytes"] == a.bulk_bytes

        t0 = time.monotonic()
        async with trio.open_nursery() as nursery:  # a few calls in flight keep the pipe full
            for _ in range(a.concurrency):
                nursery.start_soon(sender, a.bulk_calls)
        out["mb_per_s"] = a.concurrency * a.bulk_calls * a.bulk_bytes / (time.monotonic() - t0) / 1e6
    out["seconds"] = time.monotonic() - start
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--transport", default="quic")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--peer", required=True)
    p.add_argument("--packet-size", type=int, default=1200)
    p.add_argument("--bulk-bytes", type=int, default=262144)
    p.add_argument("--bulk-calls", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--cc", default="reno")
    print(json.dumps(trio.run(run, p.parse_args())), flush=True)


if __name__ == "__main__":
    main()
