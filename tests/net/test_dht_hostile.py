"""Hostile input at a running DHT node: garbage, truncated, oversized, floods."""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest
import trio

from pymesh.net.dht import DHTConfig, DHTNode
from pymesh.proto import krpc
from pymesh.proto.identity import Identity

ME = b"\x42" * 20


def ping_bytes(tid: bytes = b"pp") -> bytes:
    return krpc.encode_query(tid, b"ping", {b"id": ME})


async def ping_from(sock: trio.socket.SocketType, port: int, tid: bytes, timeout: float = 1.0) -> bool:
    await sock.sendto(ping_bytes(tid), ("127.0.0.1", port))
    with trio.move_on_after(timeout):
        while True:
            data, _ = await sock.recvfrom(2048)
            msg = krpc.decode_message_untrusted(data)
            if msg.tid == tid:
                return isinstance(msg, krpc.Response)
    return False


@pytest.mark.timeout(60)
def test_garbage_truncated_and_oversized_datagrams() -> None:
    rng = random.Random(4)
    valid = [ping_bytes(), krpc.encode_query(b"fn", b"find_node", {b"id": ME, b"target": ME}),
             krpc.encode_query(b"gp", b"pm_get", {b"id": ME, b"target": ME, b"b": 3})]
    hostile = [b"", b"d", b"\x00" * 10, os.urandom(1400), b"d1:t" + b"9" * 20, b"l" * 1400,
               b"d1:ad2:id20:" + b"x" * 20 + b"e1:q4:ping1:t2:aa1:y1:qe" + b"junk",
               b"d1:rd2:id3:abce1:t2:zz1:y1:re", b"i" + b"9" * 1000 + b"e", b"9999999999:"]
    hostile += [v[: rng.randrange(1, len(v))] for v in valid for _ in range(20)]
    hostile += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(200)]
    hostile += [b"d" + b"1:a" * 20000 + b"e"]  # 60 kB: larger than any KRPC datagram

    async def main() -> None:
        async with DHTNode(Identity.generate(), host="127.0.0.1", config=DHTConfig(rpc_timeout=0.5)) as node:
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                await s.bind(("127.0.0.1", 0))
                for i, data in enumerate(hostile):
                    await s.sendto(data, ("127.0.0.1", node.port))
                    if i % 50 == 0:
                        await trio.sleep(0.01)
                await trio.sleep(0.2)
                assert node.stats["malformed"] >= len(hostile) // 2
                # Still up and answering.
                for i in range(5):
                    assert await ping_from(s, node.port, b"ok%d" % i)
    trio.run(main)


@pytest.mark.timeout(60)
def test_flooding_address_does_not_starve_another() -> None:
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.2", 0))
        probe.close()
    except OSError as exc:
        pytest.skip(f"cannot bind 127.0.0.2 on this host: {exc}")

    config = DHTConfig(rpc_timeout=0.5, rate_limit=100.0, rate_burst=200.0)
    flood_seconds = 3.0
    answered_to_flooder = 0
    sent_by_flooder = 0

    def flood(port: int, stop: threading.Event) -> None:
        nonlocal answered_to_flooder, sent_by_flooder
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.2", 0))
        s.setblocking(False)
        packet = ping_bytes(b"fl")
        end = time.monotonic() + flood_seconds
        # Paced at most ~2,000 datagrams/s: 20x the limiter's rate, so the limiter must drop
        # most of them. Unpaced (100k/s from a thread sharing the GIL) the flood overflowed the
        # node's kernel receive buffer whenever the machine was loaded, and the honest pings were
        # lost in the kernel, before any rate limiter could see them: that measured the CPU,
        # not the limiter.
        while time.monotonic() < end and not stop.is_set():
            for _ in range(10):
                try:
                    s.sendto(packet, ("127.0.0.1", port))
                    sent_by_flooder += 1
                except BlockingIOError:
                    break
            while True:
                try:
                    s.recv(2048)
                    answered_to_flooder += 1
                except BlockingIOError:
                    break
            time.sleep(0.005)
        s.close()

    async def main() -> None:
        async with DHTNode(Identity.generate(), host="127.0.0.1", config=config) as node:
            stop = threading.Event()
            thread = threading.Thread(target=flood, args=(node.port, stop), daemon=True)
            thread.start()
            try:
                answered = 0
                asked = 0
                with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    await s.bind(("127.0.0.1", 0))
                    await trio.sleep(0.3)
                    end = time.monotonic() + flood_seconds - 0.6
                    while time.monotonic() < end and asked < 40:
                        asked += 1
                        answered += await ping_from(s, node.port, b"c%d" % asked, timeout=1.0)
                        await trio.sleep(0.05)
            finally:
                stop.set()
                await trio.to_thread.run_sync(thread.join)
            print(f"\nflooder sent {sent_by_flooder}, got {answered_to_flooder} answers; "
                  f"127.0.0.1 got {answered}/{asked}; limiter dropped {node.limiter.dropped}")
            assert asked >= 5 and answered >= 0.9 * asked
            assert node.limiter.dropped > 0
            # The flooder gets its own budget only: burst + rate * duration (plus slack).
            assert answered_to_flooder <= 200 + 100 * (flood_seconds + 1) + 50
    trio.run(main)
