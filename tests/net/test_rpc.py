"""RPC over QUIC, TCP+TLS and plaintext TCP on loopback."""

from __future__ import annotations

import pytest
import torch
import trio

from pymesh.errors import ConnectionClosed, PeerUnavailable
from pymesh.proto.frames import Meta, TensorBlob
from pymesh.net.rpc import CallContext, Connection, RemoteError
from pymesh.model.blobs import blob_to_tensor, tensor_to_blob

from tests.net.helpers import node_pair


async def echo(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
    return {"meta": meta, "caller": ctx.peer.key}, tensors


@pytest.mark.timeout(90)
def test_echo_sizes_byte_exact(transport: str) -> None:
    sizes = [0, 1, 1199, 1200, 8192, 65537, 1 << 20, 16 << 20]

    async def main() -> None:
        async with node_pair(transport) as (server, client, conn):
            server.register("echo", echo)
            gen = torch.Generator().manual_seed(0)
            for n in sizes:
                x = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
                meta, out = await conn.call("echo", {"n": n}, [tensor_to_blob(x)], timeout=60)
                assert meta["meta"] == {"n": n} and meta["caller"] == client.peer_id.key
                assert len(out) == 1 and out[0].shape == (n,)
                assert torch.equal(blob_to_tensor(out[0]), x), f"{n} bytes came back different"
            # Several dtypes in one frame, bf16 included (no numpy dtype for it).
            ts = [torch.randn(3, 5), torch.randn(7).to(torch.bfloat16), torch.arange(6).reshape(2, 3),
                  torch.tensor([True, False])]
            _, out = await conn.call("echo", {}, [tensor_to_blob(t) for t in ts], timeout=10)
            for t, b in zip(ts, out):
                assert torch.equal(blob_to_tensor(b), t)

    trio.run(main)


@pytest.mark.timeout(60)
def test_concurrent_and_sequential_calls(transport: str) -> None:
    async def main() -> None:
        async with node_pair(transport) as (server, client, conn):
            async def slow_echo(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]):  # type: ignore[no-untyped-def]
                await trio.sleep(0.01)
                return meta, tensors
            server.register("echo", slow_echo)
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                payload = bytes([i]) * (1000 + 97 * i)
                meta, out = await conn.call("echo", {"i": i}, [TensorBlob("uint8", (len(payload),),
                                                                          memoryview(payload))], timeout=30)
                assert meta == {"i": i}
                results[i] = bytes(out[0].data)

            async with trio.open_nursery() as nursery:
                for i in range(64):
                    nursery.start_soon(one, i)
            assert all(results[i] == bytes([i]) * (1000 + 97 * i) for i in range(64))

            server.register("echo", echo)
            for i in range(1000):
                meta, _ = await conn.call("echo", {"i": i}, timeout=10)
                assert meta["meta"] == {"i": i}
            assert not conn.closed

    trio.run(main)


@pytest.mark.timeout(60)
def test_remote_errors_timeouts_and_unknown_methods(transport: str) -> None:
    async def main() -> None:
        async with node_pair(transport) as (server, client, conn):
            async def refuse(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]):  # type: ignore[no-untyped-def]
                raise RemoteError("busy", "no cache left for 512 tokens")

            async def crash(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]):  # type: ignore[no-untyped-def]
                raise ZeroDivisionError("oops")

            async def hang(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]):  # type: ignore[no-untyped-def]
                await trio.sleep_forever()

            server.register("refuse", refuse)
            server.register("crash", crash)
            server.register("hang", hang)
            server.register("echo", echo)
            with pytest.raises(RemoteError) as info:
                await conn.call("refuse", {})
            assert (info.value.code, info.value.message) == ("busy", "no cache left for 512 tokens")
            with pytest.raises(RemoteError) as info:
                await conn.call("crash", {})
            assert info.value.code == "internal" and "ZeroDivisionError" in info.value.message
            with pytest.raises(RemoteError) as info:
                await conn.call("nope", {})
            assert info.value.code == "not_found"
            with pytest.raises(PeerUnavailable, match="timed out"):
                await conn.call("hang", {}, timeout=0.2)
            meta, _ = await conn.call("echo", {"still": 1}, timeout=10)
            assert meta["meta"] == {"still": 1}

    trio.run(main)


@pytest.mark.timeout(60)
def test_cancel_mid_transfer_leaves_connection_usable(transport: str) -> None:
    async def main() -> None:
        async with node_pair(transport) as (server, client, conn):
            server.register("echo", echo)

            async def slow_echo(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
                await trio.sleep(2)  # the reply can never beat the cancel, however fast the link
                return await echo(ctx, meta, tensors)

            server.register("slow_echo", slow_echo)
            big = torch.zeros(32 << 20, dtype=torch.uint8)
            with trio.move_on_after(0.02) as scope:  # lands while the 32 MB upload is in flight
                await conn.call("slow_echo", {}, [tensor_to_blob(big)])
            assert scope.cancelled_caught
            x = torch.arange(1000, dtype=torch.int64)
            for _ in range(3):
                _, out = await conn.call("echo", {}, [tensor_to_blob(x)], timeout=20)
                assert torch.equal(blob_to_tensor(out[0]), x)
            assert not conn.closed

    trio.run(main)


@pytest.mark.timeout(60)
def test_push_both_directions(transport: str) -> None:
    async def main() -> None:
        async with node_pair(transport) as (server, client, conn):
            got_server: list[tuple[Meta, bytes]] = []
            got_client: list[tuple[Meta, bytes]] = []
            done = trio.Event()

            async def at_server(c: Connection, meta: Meta, tensors: list[TensorBlob]) -> None:
                got_server.append((meta, bytes(tensors[0].data)))
                assert c.peer == client.peer_id
                await c.push("result", {"step": meta["step"]}, tensors)  # push back on the same connection

            async def at_client(c: Connection, meta: Meta, tensors: list[TensorBlob]) -> None:
                got_client.append((meta, bytes(tensors[0].data)))
                if len(got_client) == 5:
                    done.set()

            server.on_push("hidden", at_server)
            client.on_push("result", at_client)
            for step in range(5):
                payload = bytes([step]) * 5000
                await conn.push("hidden", {"step": step}, [TensorBlob("uint8", (5000,), memoryview(payload))])
            with trio.fail_after(10):
                await done.wait()
            assert sorted(m["step"] for m, _ in got_server) == list(range(5))  # type: ignore[type-var]
            assert sorted((m["step"], d) for m, d in got_client) == [  # type: ignore[type-var]
                (s, bytes([s]) * 5000) for s in range(5)]

            # The server can also call the client over the client's own connection.
            client.register("echo", echo)
            server_conn = server.connections()[0]
            meta, _ = await server_conn.call("echo", {"back": 1}, timeout=10)
            assert meta["meta"] == {"back": 1} and meta["caller"] == server.peer_id.key

    trio.run(main)


@pytest.mark.timeout(30)
def test_connect_reuses_and_aclose(transport: str) -> None:
    async def main() -> None:
        async with node_pair(transport) as (server, client, conn):
            server.register("echo", echo)
            again = await client.connect("127.0.0.1", server.test_port, server.peer_id)  # type: ignore[attr-defined]
            assert again is conn and conn.peer == server.peer_id
            await conn.aclose()
            assert conn.closed and conn.closed_locally
            # Using a connection this node closed is this node's mistake, not the peer's absence.
            with pytest.raises(ConnectionClosed):
                await conn.call("echo", {})
            with pytest.raises(ConnectionClosed):
                await conn.push("topic", {})
            assert not issubclass(ConnectionClosed, PeerUnavailable)
            fresh = await client.connect("127.0.0.1", server.test_port, server.peer_id)  # type: ignore[attr-defined]
            assert fresh is not conn
            meta, _ = await fresh.call("echo", {"x": 1}, timeout=10)
            assert meta["meta"] == {"x": 1}

    trio.run(main)


def test_tensor_views_are_zero_copy() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    blob = tensor_to_blob(t)
    t[0, 0] = 42.0  # the blob is a view of t's storage, not a copy
    assert torch.frombuffer(bytearray(blob.data[:4]), dtype=torch.float32).item() == 42.0
    bf = torch.randn(5).to(torch.bfloat16)
    assert blob_to_tensor(tensor_to_blob(bf)).equal(bf)
    received = TensorBlob("float32", (2,), memoryview(bytearray(8)))
    back = blob_to_tensor(received)
    back[1] = 7.0  # the tensor wraps the received buffer
    assert bytes(received.data[4:]) == torch.tensor([7.0]).numpy().tobytes()


@pytest.mark.timeout(60)
def test_payloads_land_in_the_node_allocator(transport: str) -> None:
    async def main() -> None:
        async with node_pair(transport) as (server, client, conn):
            handed_out: list[memoryview] = []

            def alloc(n: int) -> memoryview:
                view = memoryview(bytearray(n))
                handed_out.append(view)
                return view

            server.allocator = alloc
            seen: list[bool] = []

            async def check(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]):  # type: ignore[no-untyped-def]
                seen.append(any(t.data.obj is v.obj for t in tensors for v in handed_out))
                return {}, []

            server.register("check", check)
            await conn.call("check", {}, [tensor_to_blob(torch.ones(1000))], timeout=10)
            assert seen == [True] and [len(v) for v in handed_out] == [4000]

    trio.run(main)


@pytest.mark.timeout(60)
def test_handler_concurrency_is_bounded(transport: str) -> None:
    async def main() -> None:
        from tests.net.helpers import fast_config
        async with node_pair(transport, server_config=fast_config(max_concurrent_handlers=2)) as (server, _, conn):
            running = 0
            peak = 0
            release = trio.Event()

            async def wait(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]):  # type: ignore[no-untyped-def]
                nonlocal running, peak
                running += 1
                peak = max(peak, running)
                await release.wait()
                running -= 1
                return meta, []

            server.register("wait", wait)
            done: list[int] = []

            async def one(i: int) -> None:
                meta, _ = await conn.call("wait", {"i": i}, timeout=30)
                done.append(int(meta["i"]))  # type: ignore[call-overload]

            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(one, i)
                with trio.fail_after(20):
                    while peak < 2:
                        await trio.sleep(0.01)
                await trio.sleep(0.3)  # the other eight are queued, not running
                assert peak == 2 and not done
                release.set()
            assert sorted(done) == list(range(10)) and peak == 2

    trio.run(main)


@pytest.mark.timeout(60)
def test_two_listening_nodes_dial_each_other(transport: str) -> None:
    """Workers listen and dial from the same node; a connection either side opened serves both."""
    async def main() -> None:
        from pymesh.net.rpc import RpcNode
        from pymesh.proto.identity import Identity
        from tests.net.helpers import fast_config
        a_id, b_id = Identity.generate(), Identity.generate()
        async with RpcNode(a_id, transport=transport, config=fast_config()) as a, \
                RpcNode(b_id, transport=transport, config=fast_config()) as b:
            a.register("echo", echo)
            b.register("echo", echo)
            a_port = await a.listen("127.0.0.1", 0)
            b_port = await b.listen("127.0.0.1", 0)
            ab = await a.connect("127.0.0.1", b_port, b_id.peer_id)
            meta, _ = await ab.call("echo", {"x": 1}, timeout=10)
            assert meta["caller"] == a_id.peer_id.key
            # b already holds the inbound connection from a: connect() reuses it.
            ba = await b.connect("127.0.0.1", a_port, a_id.peer_id)
            assert ba.peer == a_id.peer_id and len(b.connections()) == 1
            meta, _ = await ba.call("echo", {"x": 2}, timeout=10)
            assert meta["caller"] == b_id.peer_id.key

    trio.run(main)


@pytest.mark.timeout(60)
def test_quic_send_buffers_stay_bounded() -> None:
    """aioquic buffers whatever it is given; the driver waits for ACKs so that unacknowledged
    bytes stay within send_buffer per stream and connection_send_buffer per connection."""
    async def main() -> None:
        from tests.net.helpers import fast_config
        cfg = fast_config(send_buffer=1 << 20, connection_send_buffer=2 << 20)
        async with node_pair("quic", client_config=cfg) as (server, client, conn):
            async def sink(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]):  # type: ignore[no-untyped-def]
                return {"n": sum(t.nbytes for t in tensors)}, []
            server.register("sink", sink)
            driver = conn.driver  # type: ignore[attr-defined]
            peak = 0

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, driver._unacked_total())
                    await trio.sleep(0)

            big = TensorBlob("uint8", (8 << 20,), memoryview(bytearray(8 << 20)))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                async with trio.open_nursery() as calls:
                    for _ in range(4):
                        calls.start_soon(conn.call, "sink", {}, [big])
                nursery.cancel_scope.cancel()
            # one chunk (256 KiB) may be queued after the check passes
            assert 0 < peak <= (2 << 20) + 256 * 1024, peak

    trio.run(main)
