"""Hostile peers: each is rejected with the right error while the server keeps serving."""

from __future__ import annotations

import logging
import random
import socket

import pytest
import trio

from pymesh.errors import IdentityError, PeerUnavailable, VersionMismatch
from pymesh.net import tcp as tcp_mod
from pymesh.proto.frames import HEADER, MAGIC, FrameType, Meta, TensorBlob, encode_frame
from pymesh.net.quic import QuicRpcConnection
from pymesh.net.rpc import CallContext, RpcNode
from pymesh.proto.identity import Identity
from tests.net.helpers import fast_config, node_pair


async def echo(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
    return meta, tensors


async def still_serves(server: RpcNode) -> None:
    """A fresh, honest client gets an answer."""
    async with RpcNode(Identity.generate(), transport=_name(server), config=fast_config()) as other:
        conn = await other.connect("127.0.0.1", server.test_port, server.peer_id)  # type: ignore[attr-defined]
        meta, _ = await conn.call("echo", {"ok": 1}, timeout=10)
        assert meta == {"ok": 1}


def _name(node: RpcNode) -> str:
    return node.transport if node.config.tls or node.transport == "quic" else "tcp-plain"


@pytest.mark.timeout(30)
def test_garbage_datagrams_are_dropped() -> None:
    async def main() -> None:
        async with node_pair("quic") as (server, client, conn):
            server.register("echo", echo)
            rng = random.Random(5)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                for i in range(400):
                    size = rng.choice([1, 20, 1199, 1200, 1452, 3000])
                    data = bytearray(rng.randbytes(size))
                    if i % 2:
                        data[0] = 0xC0 | (data[0] & 0x0F)  # long header, INITIAL type
                        data[1:5] = b"\x00\x00\x00\x01"    # QUIC v1
                    sock.sendto(bytes(data), ("127.0.0.1", server.test_port))  # type: ignore[attr-defined]
                    if i % 50 == 0:
                        await trio.sleep(0)
            finally:
                sock.close()
            await trio.sleep(0.2)
            assert server._endpoint is not None and server._endpoint.dropped > 100
            meta, _ = await conn.call("echo", {"after": "garbage"}, timeout=10)
            assert meta == {"after": b"garbage"}
            await still_serves(server)

    trio.run(main)


async def _raw_tcp_session(server: RpcNode) -> tcp_mod.TcpConnection:
    """An authenticated TCP connection whose bytes the test writes by hand."""
    liar = RpcNode(Identity.generate(), transport=_name(server), config=server.config)
    return await tcp_mod.dial(liar, "127.0.0.1", server.test_port, server.peer_id)  # type: ignore[attr-defined]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport", ["tcp", "tcp-plain"])
@pytest.mark.parametrize("attack", ["truncated", "oversized", "bad_magic", "slow"])
def test_tcp_bad_frames_close_only_that_connection(transport: str, attack: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pymesh")

    async def main() -> None:
        cfg = fast_config(frame_timeout=0.5)
        async with node_pair(transport, server_config=cfg) as (server, client, conn):
            server.register("echo", echo)
            raw = await _raw_tcp_session(server)
            full = encode_frame(FrameType.CALL, 1, name="echo",
                                tensors=[TensorBlob("uint8", (1000,), memoryview(bytes(1000)))])
            if attack == "truncated":
                await raw._raw.send_all(full[:600])
                await raw._raw.aclose()
                expected = "truncated"
            elif attack == "oversized":
                await raw._raw.send_all(HEADER.pack(MAGIC, 1, FrameType.CALL, 0, 1, 0, 4 << 30))
                expected = "exceeds the cap"
            elif attack == "bad_magic":
                await raw._raw.send_all(b"GET / HTTP/1.1\r\n\r\n" + bytes(20))
                expected = "magic"
            else:
                await raw._raw.send_all(full[:600])  # then nothing: hold the frame open
                expected = "frame_timeout"
            # Meanwhile the honest client is served.
            meta, _ = await conn.call("echo", {"during": 1}, timeout=10)
            assert meta == {"during": 1}
            with trio.fail_after(5):
                while not any(expected in r.getMessage() for r in caplog.records):
                    await trio.sleep(0.05)
            if attack != "truncated":
                # The server closed the offending connection: our reads see EOF.
                with trio.fail_after(5):
                    assert await raw._reader.at_eof()
            await still_serves(server)

    trio.run(main)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("attack", ["oversized", "truncated", "slow"])
def test_quic_bad_stream_is_reset_and_connection_survives(attack: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pymesh")

    async def main() -> None:
        cfg = fast_config(frame_timeout=0.5)
        async with node_pair("quic", server_config=cfg) as (server, client, conn):
            server.register("echo", echo)
            assert isinstance(conn, QuicRpcConnection)
            driver = conn.driver
            stream = driver.open_stream()
            full = encode_frame(FrameType.CALL, 0, name="echo",
                                tensors=[TensorBlob("uint8", (1000,), memoryview(bytes(1000)))])
            if attack == "oversized":
                await driver.send(stream, HEADER.pack(MAGIC, 1, FrameType.CALL, 0, 0, 0, 4 << 30), end=True)
                expected = "exceeds the cap"
            elif attack == "truncated":
                await driver.send(stream, full[:500], end=True)
                expected = "truncated"
            else:
                await driver.send(stream, full[:500], end=False)
                expected = "frame_timeout"
            meta, _ = await conn.call("echo", {"during": 1}, timeout=10)  # same connection, other stream
            assert meta == {"during": 1}
            with trio.fail_after(5):
                while not any(expected in r.getMessage() for r in caplog.records):
                    await trio.sleep(0.05)
                while stream.error is None:  # the server reset our stream
                    await trio.sleep(0.02)
            driver.forget(stream)
            meta, _ = await conn.call("echo", {"after": 1}, timeout=10)
            assert meta == {"after": 1} and not conn.closed
            await still_serves(server)

    trio.run(main)


@pytest.mark.timeout(30)
def test_wrong_pinned_key_is_refused_naming_both(transport: str) -> None:
    async def main() -> None:
        async with node_pair(transport) as (server, client, conn):
            server.register("echo", echo)
            impostor_expected = Identity.generate().peer_id
            async with RpcNode(Identity.generate(), transport=transport, config=fast_config()) as other:
                with pytest.raises(IdentityError) as info:
                    await other.connect("127.0.0.1", server.test_port, impostor_expected)  # type: ignore[attr-defined]
                text = str(info.value)
                assert str(impostor_expected) in text and str(server.peer_id) in text
            await still_serves(server)

    trio.run(main)


class LyingIdentity(Identity):
    """Claims someone else's public key but can only sign with its own."""

    def __init__(self, victim: Identity) -> None:
        super().__init__(Identity.generate().private_key)
        self.peer_id = victim.peer_id

    @property
    def public_key(self) -> bytes:
        return self.peer_id.key


@pytest.mark.timeout(30)
def test_client_lying_about_its_key_is_refused(transport: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pymesh")

    async def main() -> None:
        async with node_pair(transport) as (server, client, conn):
            server.register("echo", echo)
            liar = LyingIdentity(Identity.generate())
            async with RpcNode(liar, transport=transport, config=fast_config()) as other:
                with pytest.raises(IdentityError, match="refused our identity"):
                    await other.connect("127.0.0.1", server.test_port, server.peer_id)  # type: ignore[attr-defined]
            assert any("failed to prove" in r.getMessage() for r in caplog.records)
            assert all(c.peer != liar.peer_id for c in server.connections())
            await still_serves(server)

    trio.run(main)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("side", ["client", "server"])
def test_version_mismatch_names_both_versions(transport: str, side: str) -> None:
    async def main() -> None:
        async with node_pair(transport) as (server, client, conn):
            server.register("echo", echo)
            async with RpcNode(Identity.generate(), transport=transport, config=fast_config()) as other:
                if side == "client":
                    other.protocol_version = 999
                    with pytest.raises(VersionMismatch) as info:
                        await other.connect("127.0.0.1", server.test_port, server.peer_id)  # type: ignore[attr-defined]
                    assert (info.value.ours, info.value.theirs) == (999, server.protocol_version)
                else:
                    server.protocol_version = 999
                    try:
                        with pytest.raises(VersionMismatch) as info:
                            await other.connect("127.0.0.1", server.test_port, server.peer_id)  # type: ignore[attr-defined]
                    finally:
                        server.protocol_version = other.protocol_version
                    assert (info.value.ours, info.value.theirs) == (other.protocol_version, 999)
                assert "999" in str(info.value)
            await still_serves(server)

    trio.run(main)


@pytest.mark.timeout(30)
def test_dial_nobody_is_peer_unavailable(transport: str) -> None:
    async def main() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # a port where nothing answers (UDP bound, TCP closed)
        try:
            async with RpcNode(Identity.generate(), transport=transport,
                               config=fast_config(connect_timeout=0.5)) as node:
                with pytest.raises(PeerUnavailable):
                    await node.connect("127.0.0.1", port, Identity.generate().peer_id)
        finally:
            sock.close()

    trio.run(main)




@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport", ["tcp", "tcp-plain"])
def test_silent_dialer_is_dropped_after_connect_timeout(transport: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pymesh")

    async def main() -> None:
        async with node_pair(transport, server_config=fast_config(connect_timeout=0.5)) as (server, client, conn):
            server.register("echo", echo)
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", server.test_port))  # type: ignore[attr-defined]
            with trio.fail_after(10):
                while await sock.recv(65536):  # the server's HELLO (plaintext) comes first; then EOF
                    pass
            sock.close()
            assert any("rejected" in r.getMessage() for r in caplog.records)
            await still_serves(server)

    trio.run(main)


@pytest.mark.timeout(60)
def test_quic_peer_flooding_unread_streams_is_cut_off(caplog: pytest.LogCaptureFixture) -> None:
    """Streams queue while every handler slot is busy; a peer that keeps sending into them
    past connection_window is disconnected instead of growing the server's memory."""
    caplog.set_level(logging.INFO, logger="pymesh")

    async def main() -> None:
        cfg = fast_config(max_concurrent_handlers=1, connection_window=4 << 20)
        async with node_pair("quic", server_config=cfg) as (server, client, conn):
            release = trio.Event()

            async def block(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]):  # type: ignore[no-untyped-def]
                await release.wait()
                return {}, []

            server.register("block", block)
            server.register("echo", echo)
            big = TensorBlob("uint8", (1 << 20,), memoryview(bytearray(1 << 20)))
            failures: list[BaseException] = []

            async def one() -> None:
                try:
                    await conn.call("block", {}, [big], timeout=20)
                except PeerUnavailable as exc:
                    failures.append(exc)

            async with trio.open_nursery() as nursery:
                for _ in range(12):
                    nursery.start_soon(one)
            assert len(failures) == 12 and conn.closed
            assert any("no reader is taking" in r.getMessage() for r in caplog.records)
            release.set()
            await still_serves(server)

    trio.run(main)
