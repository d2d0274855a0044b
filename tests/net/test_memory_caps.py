"""Memory a peer can make a node hold (issue 11, item 2), over in-memory streams on trio's
virtual clock (tests/hostile/test_preauth_memory.py repeats the pre-auth attack with 64
real connections against a server process, over TCP and QUIC):

* handshake frames are capped (no tensors) on both sides: an unauthenticated peer that
  announces 512 MiB is dropped at once, and a dialer facing such a server fails with
  PeerUnavailable, allocating nothing large;
* after authentication payload memory follows the bytes that arrived, not the sizes
  announced, and is capped per connection and per node (``max_inflight_*``).

Allocations are measured with tracemalloc (bytearray growth is traced), so the figures do
not depend on what else runs on the machine.
"""

from __future__ import annotations

import logging
import tracemalloc
from contextlib import contextmanager
from typing import Any, Awaitable, Callable, Iterator

import pytest
import trio
import trio.testing

from pymesh.errors import PeerUnavailable
from pymesh.net.rpc import Connection, Meta, RpcNode, TensorBlob
from pymesh.net.streams import AnyStream, BufferedReader
from pymesh.proto import bencode
from pymesh.proto.frames import FRAME_VERSION, HEADER, MAGIC, FrameLimits, FrameType, read_frame_untrusted
from pymesh.proto.identity import Identity
from tests.net.test_rpc_memory import cfg, echo, pair, run

MiB = 1 << 20
HUGE = 512 * MiB
RECV_PIECE = MiB  # frames.RECV_COMMIT_CHUNK: what a frame may commit ahead of its bytes


def announce(ftype: FrameType, payload: int, rid: int = 0, name: str = "echo") -> bytes:
    """Header and metadata of a frame that announces one uint8 tensor of ``payload`` bytes."""
    env: dict[bytes, object] = {b"t": [[b"uint8", [payload]]], b"u": {b"v": 1}}
    if ftype in (FrameType.CALL, FrameType.PUSH):
        env[b"n"] = name.encode()
    meta = bencode.encode(env)
    return HEADER.pack(MAGIC, FRAME_VERSION, int(ftype), 0, rid, len(meta), payload) + meta


@contextmanager
def traced() -> Iterator[list[int]]:
    """Yields [peak bytes] filled in on exit: the most Python-allocated at once meanwhile."""
    out = [0]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        yield out
    finally:
        out[0] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()


def current_traced() -> int:
    return tracemalloc.get_traced_memory()[0]


# ----------------------------------------------------------------- before authentication


def test_unauthenticated_peer_announcing_512_mib_is_dropped_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pymesh")
    closed_after: list[float] = []

    async def main() -> None:
        async with RpcNode(Identity.generate(), transport="tcp", config=cfg(connect_timeout=5.0)) as server, \
                trio.open_nursery() as nursery:
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(server.serve_stream, b)
            reader = BufferedReader(AnyStream(a))
            await read_frame_untrusted(reader, FrameLimits())  # the server's HELLO
            t0 = trio.current_time()
            await a.send_all(announce(FrameType.AUTH, HUGE))  # and never the payload
            with trio.fail_after(60):
                assert await reader.at_eof()  # the server hung up
            closed_after.append(trio.current_time() - t0)
            assert server.connections() == []

    with traced() as peak:
        run(main)
    assert peak[0] < 4 * MiB, f"the server allocated {peak[0]} bytes for an unauthenticated announcement"
    assert closed_after[0] < 1.0, "dropped at once, not when connect_timeout (5 s) ran out"
    assert any("handshake" in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("attack", ["announces 512 MiB", "stalls"])
def test_dialer_facing_a_hostile_server_fails_within_connect_timeout(attack: str) -> None:
    """The "fake record pointing at such a server" case: the client and monitor dial it."""
    failed_after: list[float] = []

    async def fake_server(stream: trio.abc.Stream) -> None:
        if attack == "announces 512 MiB":
            await stream.send_all(announce(FrameType.HELLO, HUGE))
        await trio.sleep_forever()

    async def main() -> None:
        async with RpcNode(Identity.generate(), transport="tcp", config=cfg(connect_timeout=5.0)) as client, \
                trio.open_nursery() as nursery:
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(fake_server, b)
            t0 = trio.current_time()
            with pytest.raises(PeerUnavailable):
                await client.connect_stream(a, Identity.generate().peer_id)
            failed_after.append(trio.current_time() - t0)
            assert client.connections() == []
            nursery.cancel_scope.cancel()

    with traced() as peak:
        run(main)
    assert peak[0] < 4 * MiB, f"the dialer allocated {peak[0]} bytes for a handshake frame"
    if attack == "stalls":
        assert failed_after[0] == pytest.approx(5.0, abs=0.1)
    else:
        assert failed_after[0] < 1.0, "a 512 MiB HELLO is refused from its header, not waited for"


# ----------------------------------------------------------------- after authentication


def test_memory_follows_the_bytes_that_arrived_not_the_announcement(caplog: pytest.LogCaptureFixture) -> None:
    """An authenticated peer announces 512 MiB, sends 3 MiB and stalls: the server holds
    about 3 MiB, serves others meanwhile, and drops it after frame_timeout."""
    caplog.set_level(logging.INFO, logger="pymesh")
    held: list[int] = []

    async def main() -> None:
        server_cfg = cfg(frame_timeout=10.0, idle_timeout=60.0)
        async with pair(server_config=server_cfg, client_config=cfg(idle_timeout=60.0)) as (server, _, conn, end):
            server.register("echo", echo)
            base = current_traced()
            await end.send_all(announce(FrameType.CALL, HUGE, rid=99) + bytes(3 * MiB))
            await trio.sleep(1.0)
            held.append(current_traced() - base)
            assert held[0] < 8 * MiB, f"the server committed {held[0]} bytes for 3 MiB received"
            inflight = server.inflight
            assert 3 * MiB <= inflight.used <= 4 * MiB
            # An honest peer of the same server is served meanwhile.
            a, b = trio.testing.memory_stream_pair()
            async with RpcNode(Identity.generate(), transport="tcp", config=cfg()) as other, \
                    trio.open_nursery() as nursery:
                nursery.start_soon(server.serve_stream, b)
                honest = await other.connect_stream(a, server.peer_id)
                meta, out = await honest.call("echo", {"during": 1}, [TensorBlob("uint8", (MiB,),
                                                                                   memoryview(bytes(MiB)))])
                assert meta["meta"] == {"during": 1} and out[0].nbytes == MiB
                await honest.aclose()
                with trio.fail_after(30):  # frame_timeout drops the staller and frees its bytes
                    while not conn.closed or inflight.used:
                        await trio.sleep(0.5)
                nursery.cancel_scope.cancel()

    with traced():
        run(main)
    assert any("frame_timeout" in r.getMessage() for r in caplog.records)


def test_per_connection_cap_stops_reading_while_handlers_hold_frames() -> None:
    started: list[int] = []
    release = trio.Event()
    done: list[int] = []

    async def hold(c: Connection, meta: Meta, tensors: list[TensorBlob]) -> None:
        started.append(len(started))
        await release.wait()
        done.append(1)

    async def main() -> None:
        server_cfg = cfg(max_inflight_per_connection=4 * MiB, max_inflight_per_node=64 * MiB)
        async with pair(server_config=server_cfg) as (server, _, conn, _end):
            server.on_push("hold", hold)
            for _ in range(12):
                await conn.push("hold", {}, [TensorBlob("uint8", (MiB,), memoryview(bytes(MiB)))])
            await trio.sleep(5)
            assert len(started) == 4, "a fifth 1 MiB frame does not fit in 4 MiB: the reader waits"
            (sconn,) = server.connections()
            assert sconn.inflight.used == 4 * MiB and server.inflight.used == 4 * MiB
            release.set()
            with trio.fail_after(10):
                while len(done) < 12:
                    await trio.sleep(0.1)
            assert not sconn.closed and sconn.inflight.used == 0 and server.inflight.used == 0

    run(main)


def test_frame_larger_than_the_connection_cap_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pymesh")

    async def main() -> None:
        server_cfg = cfg(max_inflight_per_connection=2 * MiB, max_inflight_per_node=4 * MiB)
        async with pair(server_config=server_cfg) as (server, _, conn, _end):
            server.register("echo", echo)
            with pytest.raises(PeerUnavailable):
                await conn.call("echo", {}, [TensorBlob("uint8", (3 * MiB,), memoryview(bytes(3 * MiB)))],
                                timeout=10)
            assert server.inflight.used == 0

    run(main)
    assert any("max_inflight_per_connection" in r.getMessage() for r in caplog.records)


def test_node_cap_holds_under_many_stalled_frames_and_waiting_is_not_stalling(
        caplog: pytest.LogCaptureFixture) -> None:
    """Three authenticated peers each send 3 MiB of a 4 MiB frame and stall; the node cap
    (8 MiB) stops the third mid-frame. An honest 4 MiB call waits for memory (and is not
    dropped for it by frame_timeout), then goes through once the stallers are dropped."""
    caplog.set_level(logging.INFO, logger="pymesh")
    peak_used: list[int] = [0]

    async def main() -> None:
        server_cfg = cfg(frame_timeout=10.0, idle_timeout=60.0, max_inflight_per_connection=4 * MiB,
                         max_inflight_per_node=8 * MiB)
        async with RpcNode(Identity.generate(), transport="tcp", config=server_cfg) as server, \
                trio.open_nursery() as nursery:
            server.register("echo", echo)

            async def watch() -> None:
                while True:
                    peak_used[0] = max(peak_used[0], server.inflight.used)
                    await trio.sleep(0.1)

            nursery.start_soon(watch)
            stallers = []
            for _ in range(3):
                a, b = trio.testing.memory_stream_pair()
                nursery.start_soon(server.serve_stream, b)
                node = await nursery.start(_client_node)
                conn = await node.connect_stream(a, server.peer_id)
                await a.send_all(announce(FrameType.CALL, 4 * MiB, rid=7) + bytes(3 * MiB))
                stallers.append(conn)
            await trio.sleep(1.0)
            assert server.inflight.used == 8 * MiB
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(server.serve_stream, b)
            node = await nursery.start(_client_node)
            honest = await node.connect_stream(a, server.peer_id)
            t0 = trio.current_time()
            meta, _ = await honest.call("echo", {"n": 1}, timeout=5)  # no payload: needs no memory
            assert meta["meta"] == {"n": 1}
            _, out = await honest.call("echo", {}, [TensorBlob("uint8", (4 * MiB,), memoryview(bytes(4 * MiB)))],
                                       timeout=60)
            assert out[0].nbytes == 4 * MiB
            waited = trio.current_time() - t0
            assert waited >= 5.0, "it had to wait for the stallers to be dropped"
            # The two that stalled are gone; the third waited for memory most of that time,
            # which frame_timeout does not count: it is dropped later, for its own stall.
            assert stallers[0].closed and stallers[1].closed and not stallers[2].closed
            with trio.fail_after(30):
                while not stallers[2].closed or server.inflight.used:
                    await trio.sleep(0.5)
            assert not honest.closed
            nursery.cancel_scope.cancel()

    run(main)
    assert peak_used[0] <= 8 * MiB


async def _client_node(task_status: trio.TaskStatus[RpcNode] = trio.TASK_STATUS_IGNORED) -> None:
    async with RpcNode(Identity.generate(), transport="tcp", config=cfg(idle_timeout=60.0)) as node:
        task_status.started(node)
        await trio.sleep_forever()


@pytest.mark.timeout(60)
def test_quic_streams_announcing_512_mib_hold_what_arrived(caplog: pytest.LogCaptureFixture) -> None:
    """An authenticated QUIC peer opens streams that each announce 512 MiB, sends 256 KiB
    on each and stalls: the first is admitted on its connection and grows with its bytes,
    the others wait for the connection's budget; each is reset after frame_timeout."""
    from pymesh.net.quic import QuicRpcConnection
    from tests.net.helpers import fast_config, node_pair

    caplog.set_level(logging.INFO, logger="pymesh")
    held: list[int] = []

    async def main() -> None:
        async with node_pair("quic", server_config=fast_config(frame_timeout=2.0)) as (server, client, conn):
            server.register("echo", echo)
            assert isinstance(conn, QuicRpcConnection)
            driver = conn.driver
            base = current_traced()
            for _ in range(3):
                stream = driver.open_stream()
                await driver.send(stream, announce(FrameType.CALL, HUGE) + bytes(256 * 1024), end=False)
            await trio.sleep(1.0)
            held.append(current_traced() - base)
            assert held[0] < 16 * MiB, f"{held[0]} bytes held for 768 KiB received"
            inflight = server.inflight
            assert inflight.used <= RECV_PIECE
            (sconn,) = server.connections()
            assert sconn.inflight.used == HUGE  # the first stream's admission; the others wait
            meta, _ = await conn.call("echo", {"during": 1}, timeout=10)  # no payload: served
            assert meta["meta"] == {"during": 1}
            with trio.fail_after(30):  # each staller is reset after frame_timeout, in turn
                while sconn.inflight.used or inflight.used:
                    await trio.sleep(0.2)
            meta, out = await conn.call("echo", {}, [TensorBlob("uint8", (MiB,), memoryview(bytes(MiB)))], timeout=10)
            assert out[0].nbytes == MiB and not conn.closed

    with traced():
        trio.run(main)
    assert any("frame_timeout" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["tcp", "quic"])
@pytest.mark.parametrize("attack", ["announces 512 MiB", "stalls"])
def test_dialing_a_hostile_server_over_sockets(transport: str, attack: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same as the in-memory dialer test, through TLS/QUIC and ``RpcNode.connect``."""
    from pymesh.net import handshake
    from tests.net.helpers import fast_config

    evil = Identity.generate()
    original = handshake.server_handshake
    failed_after: list[float] = []

    async def hostile(identity: Identity, version: int, read: object, send: object, limits: object) -> object:
        if identity is not evil:
            return await original(identity, version, read, send, limits)  # type: ignore[arg-type]
        if attack == "announces 512 MiB":
            await send(announce(FrameType.HELLO, HUGE))  # type: ignore[operator]
        await trio.sleep_forever()

    monkeypatch.setattr(handshake, "server_handshake", hostile)

    async def main() -> None:
        async with RpcNode(evil, transport=transport, config=fast_config(connect_timeout=30)) as server, \
                RpcNode(Identity.generate(), transport=transport, config=fast_config(connect_timeout=3)) as client:
            port = await server.listen("127.0.0.1", 0)
            t0 = trio.current_time()
            with pytest.raises(PeerUnavailable):
                await client.connect("127.0.0.1", port, evil.peer_id)
            failed_after.append(trio.current_time() - t0)

    with traced() as peak:
        trio.run(main)
    assert peak[0] < 8 * MiB, f"dialing allocated {peak[0]} bytes"
    if attack == "stalls":
        assert 2.5 < failed_after[0] < 10
    else:
        assert failed_after[0] < 2.5, "refused from the HELLO's header, before connect_timeout (3 s)"


@pytest.mark.timeout(60)
def test_quic_bytes_sent_before_authentication_are_capped(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A QUIC peer that, instead of authenticating, opens a stream and sends 8 MiB into it:
    nobody reads streams before the handshake, so the server queues at most
    PREAUTH_MAX_UNREAD (64 KiB) of them and then closes the connection (it queued up to
    2 x connection_window = 128 MiB before)."""
    caplog.set_level(logging.INFO, logger="pymesh")
    outcome: list[str] = []

    async def attack(driver: Any) -> None:
        stream = driver.open_stream()
        try:
            for _ in range(32):
                await driver.send(stream, bytes(256 * 1024), end=False)
            outcome.append("all 8 MiB accepted")
        except PeerUnavailable as exc:
            outcome.append(f"cut off: {exc}")

    _run_hostile_quic_client(monkeypatch, attack, done=lambda: bool(outcome))
    assert outcome[0].startswith("cut off"), outcome
    assert any("receive buffer" in r.getMessage() or "no reader is taking" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
def test_quic_stream_gaps_before_authentication_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before authenticating, a peer sends 100 bytes at offset 16 MiB on each of 12
    streams. aioquic buffers each stream from offset 0 (a zero-filled gap) and doubles the
    connection's credit as the offsets arrive: 1.2 KB of packets make the server hold
    ~216 MiB (measured), no reader involved. Expected: under 32 MiB, the peer cut off."""
    held: list[int] = []

    async def attack(driver: Any) -> None:
        base = current_traced()
        try:
            for _ in range(12):
                stream = driver.open_stream()
                sender = driver.quic._streams[stream.sid].sender
                sender._buffer_start = sender._buffer_stop = sender.highest_offset = 16 * MiB - 100
                driver.quic.send_stream_data(stream.sid, b"x" * 100, False)
                driver.after_io()
                await trio.sleep(0.05)
        except PeerUnavailable:
            pass  # the server cut this peer off (the expected outcome)
        await trio.sleep(0.5)
        held.append(current_traced() - base)

    with traced():
        _run_hostile_quic_client(monkeypatch, attack, done=lambda: bool(held))
    assert held[0] < 32 * MiB, f"{held[0]} bytes held for 1.2 KB of stream data"


def _run_hostile_quic_client(monkeypatch: pytest.MonkeyPatch, attack: Callable[[Any], Awaitable[None]], *,
                             done: Callable[[], bool]) -> None:
    """A QUIC server and an attacker that, instead of authenticating, reads the server's HELLO
    and runs ``attack(driver)`` on its raw connection; returns once ``done()`` (20 s at most)."""
    from pymesh.net import handshake
    from tests.net.helpers import fast_config

    evil = Identity.generate()
    original = handshake.client_handshake

    async def hostile(identity: Identity, version: int, expected: object, read: object, send: object) -> None:
        if identity is not evil:
            await original(identity, version, expected, read, send)  # type: ignore[arg-type]
            return
        cells = dict(zip(send.__code__.co_freevars, (c.cell_contents for c in send.__closure__)))  # type: ignore[attr-defined]
        await read()  # type: ignore[operator]
        await attack(cells["driver"])
        await trio.sleep_forever()

    monkeypatch.setattr(handshake, "client_handshake", hostile)

    async def main() -> None:
        async with RpcNode(Identity.generate(), transport="quic", config=fast_config(connect_timeout=30)) as server, \
                RpcNode(evil, transport="quic", config=fast_config(connect_timeout=30)) as attacker, \
                trio.open_nursery() as nursery:
            server.register("echo", echo)
            port = await server.listen("127.0.0.1", 0)
            nursery.start_soon(attacker.connect, "127.0.0.1", port, server.peer_id)
            with trio.fail_after(20):
                while not done():
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(main)
