"""Per-message costs of the QUIC transport that are behaviour, not timing: datagram size
with a loopback peer, and a push's ACK leaving without aioquic's delayed-ACK timer."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from pymesh.errors import ConfigError
from pymesh.net.config import MAX_PACKET_SIZE
from pymesh.net.conn import is_loopback
from pymesh.net.quic import QuicRpcConnection
from pymesh.net.rpc import Connection, RpcNode
from pymesh.proto.frames import TensorBlob

from tests.net.helpers import fast_config, node_pair


def test_is_loopback_names_loopback_addresses_only() -> None:
    assert is_loopback(("127.0.0.1", 5000))
    assert is_loopback(("127.3.2.1", 5000))
    assert is_loopback(("::1", 5000, 0, 0))
    assert is_loopback(("::ffff:127.0.0.1", 5000, 0, 0))
    assert not is_loopback(("10.0.0.1", 5000))
    assert not is_loopback(("::ffff:192.168.1.2", 5000, 0, 0))
    assert not is_loopback(None)
    assert not is_loopback(("not an address", 1))


def test_loopback_packet_size_is_validated() -> None:
    with pytest.raises(ConfigError, match="loopback_packet_size"):
        fast_config(loopback_packet_size=MAX_PACKET_SIZE + 1)
    with pytest.raises(ConfigError, match="loopback_packet_size"):
        fast_config(loopback_packet_size=1000)
    assert fast_config(packet_size=1200, loopback_packet_size=None).packet_size_to(loopback=True) == 1200
    assert fast_config(packet_size=1200).packet_size_to(loopback=False) == 1200


def _server_conn(server: RpcNode) -> QuicRpcConnection:
    (conn,) = server.connections()
    assert isinstance(conn, QuicRpcConnection)
    return conn


async def _datagram_sizes(loopback_packet_size: int | None) -> tuple[int, int]:
    cfg = fast_config(packet_size=1200, loopback_packet_size=loopback_packet_size)
    async with node_pair("quic", server_config=cfg, client_config=cfg) as (server, _client, conn):
        assert isinstance(conn, QuicRpcConnection)
        big = TensorBlob("uint8", (40_000,), memoryview(bytes(range(256)) * 156 + bytes(64)))

        async def echo(ctx: Any, meta: Any, tensors: Any) -> Any:
            return meta, tensors

        server.register("echo", echo)
        _, out = await conn.call("echo", {}, [big], timeout=10)
        assert bytes(out[0].data) == bytes(big.data)
        return conn.driver.quic._max_datagram_size, _server_conn(server).driver.quic._max_datagram_size


def test_loopback_peers_use_loopback_packet_size_both_ways() -> None:
    assert trio.run(_datagram_sizes, MAX_PACKET_SIZE) == (MAX_PACKET_SIZE, MAX_PACKET_SIZE)


def test_loopback_packet_size_none_keeps_packet_size() -> None:
    assert trio.run(_datagram_sizes, None) == (1200, 1200)


def test_a_push_is_acknowledged_without_waiting_for_the_ack_timer() -> None:
    """A pusher waits for the peer's ACK of the whole stream (``Connection.push``); the
    receiver answers nothing on that stream, so aioquic would hold the ACK for its 1 ms
    delayed-ACK timer. The receiver acknowledges a complete push at once instead: no timer
    of the receiving connection fires while pushes are delivered."""
    async def main() -> None:
        got: list[int] = []

        async with node_pair("quic") as (server, _client, conn):
            async def on_push(c: Connection, meta: Any, tensors: Any) -> None:
                got.append(int(meta["i"]))

            server.on_push("t", on_push)
            await conn.push("t", {"i": -1}, [TensorBlob("uint8", (3000,), memoryview(bytes(3000)))])
            driver = _server_conn(server).driver
            fired: list[float] = []
            original = driver.quic.handle_timer

            def handle_timer(now: float) -> None:
                fired.append(now)
                original(now)

            driver.quic.handle_timer = handle_timer  # type: ignore[method-assign]
            for i in range(5):
                await conn.push("t", {"i": i}, [TensorBlob("uint8", (3000,), memoryview(bytes(3000)))])
            driver.quic.handle_timer = original  # type: ignore[method-assign]
            assert fired == []
            with trio.fail_after(5):
                while len(got) < 6:
                    await trio.sleep(0.01)
            assert sorted(got) == [-1, 0, 1, 2, 3, 4]

    trio.run(main)


def test_an_answered_call_costs_the_server_no_empty_transmit() -> None:
    """The endpoint transmits for a connection after its woken tasks had their turn: a
    handler that answers at once sends the ACK with its reply, and the endpoint's own
    transmit finds nothing to do and is skipped. (trio runs ready tasks in either order;
    before, about half of all calls paid a ``datagrams_to_send`` that sent nothing.) A
    few may still happen: the client's own delayed ACK, if it waits over 1 ms between
    calls, arrives as a datagram of its own."""
    async def main() -> None:
        async with node_pair("quic") as (server, _client, conn):
            async def echo(ctx: Any, meta: Any, tensors: Any) -> Any:
                return meta, tensors

            server.register("echo", echo)
            blob = TensorBlob("uint8", (8192,), memoryview(bytes(8192)))
            for _ in range(5):
                await conn.call("echo", {}, [blob], timeout=5)
            quic = _server_conn(server).driver.quic
            empty: list[float] = []
            original = quic.datagrams_to_send

            def datagrams_to_send(now: float) -> Any:
                out = original(now=now)
                if not out:
                    empty.append(now)
                return out

            quic.datagrams_to_send = datagrams_to_send  # type: ignore[method-assign]
            for _ in range(100):
                await conn.call("echo", {}, [blob], timeout=5)
            quic.datagrams_to_send = original  # type: ignore[method-assign]
            assert len(empty) <= 25, f"{len(empty)} of 100 calls made the server transmit nothing"

    trio.run(main)
