"""The processes of ``pymesh bench nat``, each run inside one network namespace (pymesh/bench/nat.py).

    python -m pymesh.bench.nat_agent relay  --port P [--bandwidth MBPS]
    python -m pymesh.bench.nat_agent server --port P --transport T [--relay PEER@HOST:PORT ...] [--punch]
    python -m pymesh.bench.nat_agent client --transport T --peer PEER --addr HOST:PORT [--reach JSON] [--punch] ...
    python -m pymesh.bench.nat_agent swarm-client --transport T --addr BOOTSTRAP --model-name NAME --tokens N

relay: QUIC and TCP RPC nodes on port P (reservations, ``relay.observe``) with a RelayService
taking circuits on TCP P, as ``pymesh relay`` runs it, without a DHT. Prints {"peer", "port"}.

server: an RpcNode serving ``echo`` and ``sink`` on port P. Given relays, it reserves at each
(RelayKeeper) and, with --punch, answers hole-punching requests (Puncher) as a worker behind NAT
does; it prints {"peer", "reach"} once its reservations are held (reach: what its record would
say, or null for a directly reachable server).

client: learns the server's reach as a record would tell it, connects (timed: dialing the
relay, the circuit's handshakes, hole punching), and measures over that connection: the round
trip of 8 KB echoes, greedy-decode-shaped calls (one 576-float hidden state each way per token,
SmolLM2's hidden size; no model runs), and one-way throughput of bulk messages. Prints one JSON
object.

swarm-client: the same decode-shaped steps through a real swarm (InferenceSession over echo
workers found through the DHT), with the path each hop took. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

RTT_BYTES = 8192
HIDDEN = 576          # SmolLM2-135M's hidden size: one decode step's activations per hop


def _config(packet_size: int | None) -> Any:
    from pymesh.settings import load_settings

    settings = load_settings()
    if packet_size is None:
        return settings.transport_config()
    return settings.transport_config(packet_size=packet_size)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _mtu(ifname: str = "eth0") -> int | None:
    try:
        with open(f"/sys/class/net/{ifname}/mtu") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


# ============================================================================ relay


async def _relay(port: int, packet_size: int | None, bandwidth: float | None) -> None:
    import trio

    from pymesh.net.relay import RelayLimits, RelayService
    from pymesh.net.rpc import RpcNode
    from pymesh.proto.identity import Identity

    identity = Identity.generate()
    limits = RelayLimits()
    if bandwidth is not None:   # MB/s; 0: no cap
        limits.bandwidth = limits.peer_bandwidth = bandwidth * 1e6 if bandwidth > 0 else 1e12
    service = RelayService(limits)
    async with RpcNode(identity, transport="quic", config=_config(packet_size)) as quic, \
            RpcNode(identity, transport="tcp", config=_config(packet_size)) as tcp, trio.open_nursery() as nursery:
        await quic.listen("0.0.0.0", port)
        await tcp.listen("0.0.0.0", port)
        await service.attach((quic, tcp), nursery, "0.0.0.0", port)
        _emit({"peer": str(identity.peer_id), "port": port,
               "peer_bandwidth": service.limits.peer_bandwidth, "bandwidth": service.limits.bandwidth})
        await trio.sleep_forever()


# ============================================================================ server


async def _echo(ctx: Any, meta: Any, tensors: Any) -> Any:
    return {}, tensors


async def _sink(ctx: Any, meta: Any, tensors: Any) -> Any:
    return {"n": sum(t.nbytes for t in tensors)}, []


def _parse_relay(text: str) -> tuple[str, str, int]:
    peer, _, addr = text.partition("@")
    host, _, port = addr.rpartition(":")
    return peer, host, int(port)


async def _server(port: int, transport: str, relays: list[str], punch: bool, packet_size: int | None) -> None:
    import trio

    from pymesh.net.punch import Puncher
    from pymesh.net.relay_client import RelayKeeper
    from pymesh.net.rpc import RpcNode
    from pymesh.proto.identity import Identity, PeerID

    found = [(PeerID.from_text(p), h, n) for p, h, n in map(_parse_relay, relays)]

    async def find() -> list[tuple[PeerID, str, int]]:
        return found

    async with RpcNode(Identity.generate(), transport=transport, config=_config(packet_size)) as node, \
            trio.open_nursery() as nursery:
        await node.listen("0.0.0.0", port)
        node.register("echo", _echo)
        node.register("sink", _sink)
        reach: dict[str, Any] | None = None
        if found:
            keeper = RelayKeeper(node, find, want=len(found), period=1.0)
            if punch:
                Puncher(node, keeper.observed)
            await nursery.start(keeper.run)
            with trio.fail_after(30):
                while len(keeper.relays()) < len(found):
                    await trio.sleep(0.1)
            r = keeper.reach(punch=punch)
            assert r is not None
            reach = {"mode": r.mode, "relays": [[PeerID(a.peer_key).to_text(), a.host, a.port] for a in r.relays],
                     "punch_addr": list(r.punch_addr) if r.punch_addr else None}
        _emit({"peer": str(node.peer_id), "port": port, "reach": reach})
        await trio.sleep_forever()


# ============================================================================ client


def _reach_of(obj: dict[str, Any]) -> Any:
    from pymesh.proto.identity import PeerID
    from pymesh.proto.reach import Reach, RelayAddr

    addr = obj.get("punch_addr")
    return Reach(str(obj["mode"]), tuple(RelayAddr(PeerID.from_text(p).key, h, int(n)) for p, h, n in obj["relays"]),
                 (str(addr[0]), int(addr[1])) if addr else None)


async def _client(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from pymesh.net.punch import Puncher
    from pymesh.net.rpc import RpcNode
    from pymesh.proto.frames import TensorBlob
    from pymesh.proto.identity import Identity, PeerID

    peer = PeerID.from_text(a.peer)
    host, _, port = a.addr.rpartition(":")
    out: dict[str, Any] = {"mtu": _mtu()}
    cfg = _config(a.packet_size)
    out["packet_size"] = cfg.packet_size if a.transport == "quic" else None
    async with RpcNode(Identity.generate(), transport=a.transport, config=cfg) as node:
        puncher = Puncher(node) if a.punch else None
        if a.reach:
            node.learn_reach(peer, _reach_of(json.loads(a.reach)))
        t0 = time.perf_counter()
        conn = await node.connect(host, int(port), peer)
        out["establish_s"] = time.perf_counter() - t0
        out["path"] = conn.path
        out["conn_transport"] = "quic" if type(conn).__name__.startswith("Quic") else "tcp"
        if puncher is not None and puncher.attempts:
            last = puncher.attempts[-1]
            out["punch"] = "ok" if last.get("ok") else "failed"
            out["punch_error"] = last.get("error")
        small = TensorBlob("uint8", (RTT_BYTES,), memoryview(os.urandom(RTT_BYTES)))
        warm = max(5, a.rtt_calls // 10)
        rtts = []
        for i in range(warm + a.rtt_calls):
            t = time.perf_counter()
            _, echoed = await conn.call("echo", {}, [small], timeout=30)
            if i >= warm:
                rtts.append(time.perf_counter() - t)
        assert bytes(echoed[0].data) == bytes(small.data), "the echo came back altered"
        out["rtt_ms_p50"] = statistics.median(rtts) * 1e3
        out["rtt_ms_p90"] = sorted(rtts)[int(0.9 * (len(rtts) - 1))] * 1e3
        hidden = np.random.default_rng(0).standard_normal(HIDDEN).astype(np.float32)
        h = TensorBlob("float32", (1, 1, HIDDEN), memoryview(hidden.tobytes()))
        t = time.perf_counter()
        for _ in range(a.tokens):
            _, (back,) = await conn.call("echo", {}, [h], timeout=30)
        out["tokens_per_s"] = a.tokens / (time.perf_counter() - t) if a.tokens else None
        bulk_bytes = int(a.bulk_mib * 1024 * 1024)
        bulk = TensorBlob("uint8", (bulk_bytes,), memoryview(bytearray(bulk_bytes)))
        await conn.call("sink", {}, [bulk], timeout=60)   # warm-up: windows open, buckets settle
        t = time.perf_counter()
        for _ in range(a.bulk_calls):
            meta, _ = await conn.call("sink", {}, [bulk], timeout=60)
            assert meta["n"] == bulk_bytes
        out["throughput_MBps"] = a.bulk_calls * bulk_bytes / (time.perf_counter() - t) / 1e6
        out["path_after"] = conn.path if not conn.closed else "closed"
        await conn.aclose()
    return out


# ============================================================================ swarm client


async def _swarm_client(a: argparse.Namespace) -> dict[str, Any]:
    """Decode-shaped steps through a real swarm: echo workers found through the DHT, reached
    however their records say (direct, hole-punched, relayed), one 576-float token per step."""
    import torch

    from pymesh.client.routing import route_json
    from pymesh.client.session import InferenceSession
    from pymesh.client.swarm import Swarm
    from pymesh.settings import load_settings

    x = torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(0))
    warm = max(3, a.tokens // 10)
    t0 = time.perf_counter()
    async with Swarm([a.addr], a.model_name, transport=a.transport, settings=load_settings()) as swarm:
        async with InferenceSession(swarm, 0, 1, max_tokens=warm + a.tokens) as session:
            await session.step(x)
            establish = time.perf_counter() - t0
            for _ in range(warm - 1):
                await session.step(x)
            steps = []
            for _ in range(a.tokens):
                t = time.perf_counter()
                y = await session.step(x)
                steps.append(time.perf_counter() - t)
            if not torch.equal(y, x):
                raise RuntimeError("the echo worker changed the tensor: it is not in echo mode")
            route = route_json(session.route, swarm.node.path_to)
    return {"establish_s": establish, "route": route, "step_ms_p50": statistics.median(steps) * 1e3,
            "tokens_per_s": a.tokens / sum(steps)}


# ============================================================================ entry


def main(argv: list[str]) -> int:
    import trio

    p = argparse.ArgumentParser(prog="python -m pymesh.bench.nat_agent")
    p.add_argument("role", choices=["relay", "server", "client", "swarm-client"])
    p.add_argument("--model-name", default="echo")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--transport", default="quic", choices=["quic", "tcp"])
    p.add_argument("--packet-size", type=int, default=None)
    p.add_argument("--relay", action="append", default=[], help="PEER@HOST:PORT (server)")
    p.add_argument("--punch", action="store_true")
    p.add_argument("--bandwidth", type=float, default=None, help="relay cap in MB/s (0: none; default: RelayLimits)")
    p.add_argument("--peer", default="")
    p.add_argument("--addr", default="")
    p.add_argument("--reach", default="")
    p.add_argument("--rtt-calls", type=int, default=200)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--bulk-calls", type=int, default=8)
    p.add_argument("--bulk-mib", type=float, default=4.0)
    a = p.parse_args(argv)
    if a.role == "relay":
        trio.run(_relay, a.port, a.packet_size, a.bandwidth)
    elif a.role == "server":
        trio.run(_server, a.port, a.transport, a.relay, a.punch, a.packet_size)
    elif a.role == "swarm-client":
        _emit(trio.run(_swarm_client, a))
    else:
        _emit(trio.run(_client, a))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
