"""A standalone echo server for tests that need a peer in another process.

    python -m tests.net.echo_server --transport quic --host 127.0.0.1 --idle 2

Prints ``READY <port> <peer id>`` on stdout once listening, then serves "echo" and
"sink" until killed.
"""

from __future__ import annotations

import argparse
import sys

import trio

from pymesh.proto.frames import Meta, TensorBlob
from pymesh.net.rpc import CallContext, RpcNode, TransportConfig
from pymesh.proto.identity import Identity


async def echo(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
    return meta, tensors


async def sink(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
    return {"bytes": sum(t.nbytes for t in tensors)}, []


async def serve(args: argparse.Namespace) -> None:
    cfg = TransportConfig(packet_size=args.packet_size, idle_timeout=args.idle, congestion_control=args.cc)
    async with RpcNode(Identity.generate(), transport=args.transport, config=cfg) as node:
        node.register("echo", echo)
        node.register("sink", sink)
        port = await node.listen(args.host, args.port)
        print(f"READY {port} {node.peer_id}", flush=True)
        await trio.sleep_forever()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--transport", default="quic")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--idle", type=float, default=30.0)
    p.add_argument("--packet-size", type=int, default=1452)
    p.add_argument("--cc", default="reno")
    try:
        trio.run(serve, p.parse_args())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
