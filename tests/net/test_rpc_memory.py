"""RPC semantics over in-memory byte streams (no sockets), under trio's virtual clock.

Two ``RpcNode``s talk through ``trio.testing.memory_stream_pair()`` (``connect_stream`` /
``serve_stream``): the same framing, handshake, dispatch and keep-alive code as TCP, so
call/reply, remote errors, cancellation, timeouts, pushes, ordering and size caps are
checked here deterministically; tests/net/test_rpc.py keeps the real-socket checks per
transport.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest
import trio
import trio.testing

from pymesh.errors import ConnectionClosed, IdentityError, PeerUnavailable
from pymesh.net.rpc import CallContext, Connection, Meta, RemoteError, RpcNode, TensorBlob, TransportConfig
from pymesh.proto.identity import Identity
from pymesh.proto.vocab import RpcErrorCode


def cfg(**overrides: object) -> TransportConfig:
    base: dict[str, object] = dict(idle_timeout=10.0, connect_timeout=5.0, frame_timeout=10.0)
    base.update(overrides)
    return TransportConfig(**base)  # type: ignore[arg-type]


def run(main: object) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))  # type: ignore[arg-type]


class Freezable(trio.abc.Stream):
    """A stream that can go silent, like a peer whose machine stopped: after ``freeze()``
    it swallows what is sent and nothing more arrives."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.frozen = trio.Event()
        self._reading = trio.CancelScope()

    def freeze(self) -> None:
        self.frozen.set()
        self._reading.cancel()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self.frozen.is_set():
            await self.inner.send_all(data)
        else:
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        while not self.frozen.is_set():
            with trio.CancelScope() as self._reading:
                return await self.inner.receive_some(max_bytes)
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def pair(server_config: TransportConfig | None = None, client_config: TransportConfig | None = None,
               wrap: type[trio.abc.Stream] | None = None,
               ) -> AsyncIterator[tuple[RpcNode, RpcNode, Connection, trio.abc.Stream]]:
    """(server, client, client's connection, the client's end of the byte stream)."""
    server_id, client_id = Identity.generate(), Identity.generate()
    async with RpcNode(server_id, transport="tcp", config=server_config or cfg()) as server, \
            RpcNode(client_id, transport="tcp", config=client_config or cfg()) as client, \
            trio.open_nursery() as nursery:
        a, b = trio.testing.memory_stream_pair()
        end: trio.abc.Stream = wrap(a) if wrap is not None else a  # type: ignore[call-arg]
        nursery.start_soon(server.serve_stream, b)
        conn = await client.connect_stream(end, server.peer_id)
        yield server, client, conn, end
        nursery.cancel_scope.cancel()


async def echo(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
    return {"meta": dict(meta), "caller": ctx.peer.key}, tensors


def blob(n: int, fill: int = 7) -> TensorBlob:
    return TensorBlob("uint8", (n,), memoryview(bytes([fill]) * n))


def test_call_reply_and_authenticated_caller() -> None:
    async def main() -> None:
        async with pair() as (server, client, conn, _):
            server.register("echo", echo)
            assert conn.peer == server.peer_id
            meta, out = await conn.call("echo", {"x": 1, "s": b"\x00\xff"}, [blob(3), blob(0)])
            assert meta == {"meta": {"x": 1, "s": b"\x00\xff"}, "caller": client.peer_id.key}
            assert [bytes(t.data) for t in out] == [b"\x07" * 3, b""]
            assert conn in client.connections() and len(server.connections()) == 1
    run(main)


def test_wrong_peer_id_fails_the_handshake() -> None:
    async def main() -> None:
        async with RpcNode(Identity.generate(), transport="tcp") as server, \
                RpcNode(Identity.generate(), transport="tcp") as client, trio.open_nursery() as nursery:
            a, b = trio.testing.memory_stream_pair()
            nursery.start_soon(server.serve_stream, b)
            with pytest.raises(IdentityError):
                await client.connect_stream(a, Identity.generate().peer_id)
            assert server.connections() == []
    run(main)


def test_remote_errors_keep_code_and_message() -> None:
    async def refuse(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        raise RemoteError("busy", "come back later")

    async def crash(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        raise KeyError("oops")

    async def main() -> None:
        async with pair() as (server, _, conn, _end):
            server.register("refuse", refuse)
            server.register("crash", crash)
            with pytest.raises(RemoteError) as err:
                await conn.call("refuse")
            assert (err.value.code, err.value.message) == ("busy", "come back later")
            with pytest.raises(RemoteError) as err:
                await conn.call("missing")
            assert err.value.code == RpcErrorCode.NOT_FOUND and "missing" in err.value.message
            with pytest.raises(RemoteError) as err:
                await conn.call("crash")
            assert err.value.code == RpcErrorCode.INTERNAL and err.value.code == "internal" and "KeyError" in err.value.message
            assert not conn.closed  # an error answer is an answer: the connection stays
    run(main)


def test_timeout_raises_peer_unavailable_and_cancels_the_handler() -> None:
    started, cancelled = trio.Event(), trio.Event()

    async def slow(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        started.set()
        try:
            await trio.sleep(60)
        except trio.Cancelled:
            cancelled.set()
            raise
        return {}, []

    async def main() -> None:
        async with pair() as (server, _, conn, _end):
            server.register("slow", slow)
            server.register("echo", echo)
            t0 = trio.current_time()
            with pytest.raises(PeerUnavailable, match="timed out"):
                await conn.call("slow", timeout=1.5)
            assert trio.current_time() - t0 == pytest.approx(1.5)
            with trio.fail_after(1):
                await cancelled.wait()  # the caller's CANCEL frame reached the handler
            assert started.is_set()
            meta, _ = await conn.call("echo", {"after": 1})
            assert meta["meta"] == {"after": 1}
    run(main)


def test_caller_cancellation_cancels_the_handler() -> None:
    cancelled = trio.Event()

    async def slow(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        try:
            await trio.sleep(60)
        finally:
            cancelled.set()
        return {}, []

    async def main() -> None:
        async with pair() as (server, _, conn, _end):
            server.register("slow", slow)
            with trio.move_on_after(0.5) as scope:
                await conn.call("slow", {}, [blob(1 << 20)])
            assert scope.cancelled_caught
            with trio.fail_after(1):
                await cancelled.wait()
            assert not conn.closed
    run(main)


def test_concurrent_calls_get_their_own_replies() -> None:
    async def delayed(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        i = meta["i"]
        assert isinstance(i, int)
        await trio.sleep((20 - i) * 0.01)  # later calls answer first
        return {"i": i}, [blob(i, fill=i)]

    async def main() -> None:
        async with pair() as (server, _, conn, _end):
            server.register("delayed", delayed)
            got: dict[int, tuple[Meta, list[TensorBlob]]] = {}

            async def one(i: int) -> None:
                got[i] = await conn.call("delayed", {"i": i})

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(one, i)
            for i in range(20):
                meta, out = got[i]
                assert meta == {"i": i} and bytes(out[0].data) == bytes([i]) * i
    run(main)


def test_pushes_both_ways_arrive_in_order() -> None:
    async def main() -> None:
        async with pair() as (server, client, conn, _end):
            at_server: list[int] = []
            at_client: list[int] = []
            done = trio.Event()

            async def on_server(c: Connection, meta: Meta, tensors: list[TensorBlob]) -> None:
                n = meta["n"]
                assert isinstance(n, int)
                at_server.append(n)
                await c.push("back", {"n": n}, tensors)  # answer on the connection it came on

            async def on_client(c: Connection, meta: Meta, tensors: list[TensorBlob]) -> None:
                n = meta["n"]
                assert isinstance(n, int)
                at_client.append(n)
                assert bytes(tensors[0].data) == bytes([n % 256]) * 4
                if len(at_client) == 50:
                    done.set()

            server.on_push("forth", on_server)
            client.on_push("back", on_client)
            for n in range(50):
                await conn.push("forth", {"n": n}, [blob(4, fill=n % 256)])
            with trio.fail_after(5):
                await done.wait()
            assert at_server == list(range(50))
            assert sorted(at_client) == list(range(50))
            await conn.push("nobody-listens", {})  # dropped with a log line, nothing breaks
            assert not conn.closed
    run(main)


def test_size_caps_local_and_remote() -> None:
    async def main() -> None:
        small = cfg(max_frame_bytes=1024, max_meta_bytes=256)
        async with pair(server_config=small) as (server, client, conn, _end):
            server.register("echo", echo)
            # Over the caller's own cap: refused before anything is sent.
            with pytest.raises(ValueError, match="max_meta_bytes"):
                await conn.call("echo", {"pad": b"x" * (128 * 1024)})
            meta, _ = await conn.call("echo", {}, [blob(1000)])
            assert meta["meta"] == {}
            # Over the receiver's cap: the server drops the connection (a protocol error).
            with pytest.raises(PeerUnavailable):
                await conn.call("echo", {}, [blob(4096)], timeout=5)
            with trio.fail_after(5):
                while not conn.closed:
                    await trio.sleep(0.01)
            assert server.connections() == []
    run(main)


def test_silent_peer_is_dropped_after_idle_timeout() -> None:
    async def main() -> None:
        async with pair(client_config=cfg(idle_timeout=3.0), wrap=Freezable) as (server, _, conn, end):
            server.register("echo", echo)
            await conn.call("echo", {})
            await trio.sleep(10)  # idle, but keep-alives flow: still up
            assert not conn.closed
            assert isinstance(end, Freezable)
            end.freeze()
            t0 = trio.current_time()
            with pytest.raises(PeerUnavailable):
                await conn.call("echo", {}, timeout=60)
            assert trio.current_time() - t0 <= 3.0 + 0.1  # within idle_timeout, not the call's 60 s
            assert conn.closed and not conn.closed_locally
    run(main)


def test_local_close_is_connection_closed_peer_close_is_peer_unavailable() -> None:
    async def slow(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        await trio.sleep(60)
        return {}, []

    async def main() -> None:
        async with pair() as (server, client, conn, _end):
            server.register("slow", slow)
            server.register("echo", echo)
            errors: list[BaseException] = []

            async def pending() -> None:
                try:
                    await conn.call("slow")
                except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pending)
                await trio.sleep(1)
                await conn.aclose()
            assert len(errors) == 1 and isinstance(errors[0], ConnectionClosed)
            with pytest.raises(ConnectionClosed, match="closed by this node"):
                await conn.call("echo")
            # The server's side of that connection saw its peer go away.
            with trio.fail_after(5):
                while server.connections():
                    await trio.sleep(0.01)

        async with pair() as (server, client, conn, _end):
            server.register("echo", echo)
            for c in server.connections():
                await c.aclose()
            with pytest.raises(PeerUnavailable):
                await conn.call("echo", timeout=5)
            assert conn.closed and not conn.closed_locally
    run(main)
