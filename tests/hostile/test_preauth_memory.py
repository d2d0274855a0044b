"""Pre-authentication memory (issue 11, item 2), with real sockets and a server process.

64 connections complete TLS (or QUIC's handshake), read the server's HELLO, send an AUTH
frame header that announces a 512 MiB tensor, and stall. The server process must grow by
less than 32 MiB and keep answering an honest client. Before the fix every such header
made the server zero-fill 512 MiB (64 of them: 32 GiB); the server process runs under an
address-space limit so that the old code fails with MemoryError instead of taking the
machine down.

``python -m tests.hostile.test_preauth_memory [--tree DIR] [--transports tcp,quic]`` (and
``python bench/hostile_memory.py``) prints the measured rows: RSS growth and peak of the
server, honest-call latency with and without the attack; ``--tree`` runs the server from
another checkout (a ``git worktree`` of the code before the fix).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest
import trio

from pymesh.net import handshake
from pymesh.net import quic as quic_mod
from pymesh.net import tcp as tcp_mod
from pymesh.net.rpc import RpcNode, TransportConfig
from pymesh.proto import bencode
from pymesh.proto.frames import FRAME_VERSION, HEADER, MAGIC, FrameType
from pymesh.proto.identity import Identity, PeerID

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
ATTACKERS = 64
ANNOUNCED = 512 * MiB
#: the server's address-space limit: the old code hits MemoryError after a few
#: announcements instead of exhausting the machine
ADDRESS_SPACE = 3 << 30

SERVER = r"""
import resource, sys
limit = int(sys.argv[3])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
# pymesh from the checkout in argv[4], not the one the editable install redirects to
sys.meta_path[:] = [f for f in sys.meta_path if "ScikitBuild" not in type(f).__name__]
sys.path.insert(0, sys.argv[4])
import trio
from pymesh.net.rpc import RpcNode, TransportConfig
from pymesh.proto.identity import Identity

async def echo(ctx, meta, tensors):
    return meta, tensors

async def main():
    cfg = TransportConfig(packet_size=16384, connect_timeout=float(sys.argv[2]))
    async with RpcNode(Identity.generate(), transport=sys.argv[1], config=cfg) as node:
        node.register("echo", echo)
        port = await node.listen("127.0.0.1", 0)
        print(f"READY {port} {node.peer_id}", flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return (int(fields.get("VmRSS", "0 kB").split()[0]) * 1024, int(fields.get("VmHWM", "0 kB").split()[0]) * 1024)


@contextmanager
def server_process(transport: str, tree: Path, connect_timeout: float, address_space: int = ADDRESS_SPACE,
                   ) -> Iterator[tuple[subprocess.Popen[str], int, PeerID]]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, transport, str(connect_timeout), str(address_space),
                             str(tree)], cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the child prints READY within seconds or exits (EOF)
        if not line.startswith("READY"):
            raise RuntimeError(f"server process did not start: {line!r}")
        _, port, peer = line.split()
        yield proc, int(port), PeerID.from_text(peer)
    finally:
        proc.kill()
        proc.wait(30)


def huge_auth() -> bytes:
    """An AUTH frame's header and metadata announcing one 512 MiB tensor (payload never sent)."""
    meta = bencode.encode({b"t": [[b"uint8", [ANNOUNCED]]], b"u": {b"v": 1}})
    return HEADER.pack(MAGIC, FRAME_VERSION, int(FrameType.AUTH), 0, 0, len(meta), ANNOUNCED) + meta


@contextmanager
def stalling_handshake(evil: Identity, sent: list[int], attack: str) -> Iterator[None]:
    """While active, a dial by ``evil`` reads HELLO, sends :func:`huge_auth` ("announce")
    or nothing ("silent"), and stalls."""
    original = handshake.client_handshake

    async def patched(identity: Identity, version: int, expected: PeerID, read: Callable[[], Awaitable[Any]],
                      send: Callable[[bytes], Awaitable[None]]) -> None:
        if identity is not evil:
            return await original(identity, version, expected, read, send)
        await read()
        if attack == "announce":
            await send(huge_auth())
        sent.append(1)
        await trio.sleep_forever()

    handshake.client_handshake = patched
    try:
        yield
    finally:
        handshake.client_handshake = original


async def honest_calls(transport: str, port: int, peer: PeerID, n: int = 20) -> list[float]:
    """Seconds per echo call of a fresh honest client (first: connect + call)."""
    out: list[float] = []
    async with RpcNode(Identity.generate(), transport=transport,
                       config=TransportConfig(packet_size=16384, connect_timeout=20)) as node:
        t0 = time.perf_counter()
        conn = await node.connect("127.0.0.1", port, peer)
        for i in range(n):
            await conn.call("echo", {"i": i}, timeout=20)
            out.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
    return out


async def _attack(transport: str, attack: str, port: int, peer: PeerID, n: int, sent: list[int], failed: list[str],
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    evil = Identity.generate()
    cfg = TransportConfig(packet_size=16384, connect_timeout=600)
    async with RpcNode(evil, transport=transport, config=cfg) as node, trio.open_nursery() as nursery:
        endpoints = []
        if transport == "quic":  # several source ports, a handful of connections each
            for _ in range(8):
                endpoint = quic_mod.new_endpoint(node, "127.0.0.1", 0, server=False)
                await nursery.start(endpoint.run)
                endpoints.append(endpoint)

        async def one(i: int) -> None:
            try:
                if transport == "quic":
                    await quic_mod.dial(node, endpoints[i % len(endpoints)], "127.0.0.1", port, peer)
                else:
                    await tcp_mod.dial(node, "127.0.0.1", port, peer)
            except Exception as exc:  # noqa: BLE001 - the server hung up: recorded
                failed.append(f"{type(exc).__name__}: {exc}")

        with stalling_handshake(evil, sent, attack):
            for i in range(n):
                nursery.start_soon(one, i)
            task_status.started()
            await trio.sleep_forever()


def measure(transport: str, attack: str = "announce", tree: Path = ROOT, n: int = ATTACKERS,
            address_space: int = ADDRESS_SPACE) -> dict[str, Any]:
    """One row: the server's RSS growth and peak under ``n`` connections that stall in the
    handshake after announcing 512 MiB ("announce") or sending nothing ("silent"), and
    honest-call latency before and during the attack."""
    row: dict[str, Any] = {"transport": transport, "attack": attack, "tree": str(tree), "attackers": n}
    with server_process(transport, tree, 120.0, address_space) as (proc, port, peer):
        peak = [0]

        async def poll_rss() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], _rss(proc.pid)[1])
                await trio.sleep(0.1)

        async def main() -> None:
            calm = await honest_calls(transport, port, peer)
            await trio.sleep(0.5)
            rss0 = _rss(proc.pid)[0]
            sent: list[int] = []
            failed: list[str] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll_rss)
                await nursery.start(_attack, transport, attack, port, peer, n, sent, failed)
                with trio.move_on_after(90):
                    while len(sent) + len(failed) < n and proc.poll() is None:
                        await trio.sleep(0.2)
                await trio.sleep(2.0)  # let the server read what it was sent
                rss1 = _rss(proc.pid)[0]
                during: list[float] = []
                honest_error = ""
                if proc.poll() is None:
                    try:
                        with trio.fail_after(60):
                            during = await honest_calls(transport, port, peer)
                    except Exception as exc:  # noqa: BLE001 - reported in the row
                        honest_error = f"{type(exc).__name__}: {exc}"
                rss2, hwm = _rss(proc.pid)
                hwm = max(hwm, peak[0])
                row.update(stalled=len(sent), refused=len(failed), first_refusal=(failed or [""])[0][:160],
                           server_alive=proc.poll() is None, server_exit=proc.poll(),
                           rss_before_mib=rss0 / MiB, rss_growth_mib=(max(rss1, rss2, hwm) - rss0) / MiB,
                           rss_peak_mib=hwm / MiB, honest_ok=bool(during) and not honest_error,
                           honest_error=honest_error[:160],
                           calm_connect_ms=calm[0] * 1e3, calm_call_ms=statistics.median(calm[1:]) * 1e3,
                           attack_connect_ms=during[0] * 1e3 if during else None,
                           attack_call_ms=statistics.median(during[1:]) * 1e3 if during else None)
                nursery.cancel_scope.cancel()

        trio.run(main)
    return row


@pytest.mark.timeout(300)
@pytest.mark.parametrize("attack", ["announce", "silent"])
@pytest.mark.parametrize("transport", ["tcp", "quic"])
def test_64_stalled_handshakes_cost_under_32_mib(transport: str, attack: str) -> None:
    row = measure(transport, attack)
    assert row["server_alive"], row
    assert row["stalled"] + row["refused"] == ATTACKERS, row
    assert row["rss_growth_mib"] < 32, row
    assert row["honest_ok"], row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--tree", type=Path, default=ROOT, help="checkout the server runs from (default: this one)")
    p.add_argument("--transports", default="tcp,quic")
    p.add_argument("--attacks", default="announce,silent")
    p.add_argument("--attackers", type=int, default=ATTACKERS)
    p.add_argument("--address-space-gib", type=float, default=ADDRESS_SPACE / (1 << 30),
                   help="RLIMIT_AS of the server process (keeps the old code from exhausting the machine)")
    a = p.parse_args(argv)
    for transport in a.transports.split(","):
        for attack in a.attacks.split(","):
            row = measure(transport, attack, a.tree.resolve(), a.attackers, int(a.address_space_gib * (1 << 30)))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
