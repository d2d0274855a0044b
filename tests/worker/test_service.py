"""The worker service in-process: step order, retries, pushes along the route, errors.

Two echo workers and a client, each an RpcNode over TCP on loopback in one trio run.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.proto.identity import Identity
from pymesh.worker import wire
from pymesh.worker.runtime import load_runtime
from pymesh.worker.sessions import SessionTable

pytestmark = pytest.mark.timeout(60)


class Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[str, str, dict[str, Any], list[Any]]] = []
        self.changed = trio.Event()

    def handler(self, topic: str) -> Any:
        async def on(conn: Any, meta: dict[str, Any], tensors: list[Any]) -> None:
            self.items.append((topic, conn.peer.short(), meta, tensors))
            self.changed.set()
            self.changed = trio.Event()

        return on

    async def wait(self, n: int, timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            while len(self.items) < n:
                await self.changed.wait()


async def _start(nursery: trio.Nursery, start: int, stop: int, **table: Any) -> Any:
    from pymesh.net.rpc import RpcNode
    from pymesh.worker.service import WorkerService

    node = RpcNode(Identity.generate(), transport="tcp")
    await nursery.start(_enter, node)
    port = await node.listen("127.0.0.1", 0)

    async def dial(transport: str, host: str, p: int, peer: Any) -> Any:
        return await node.connect(host, p, peer)

    svc = WorkerService(load_runtime(None, start, stop, device="cpu", dtype_name="float32"),
                        SessionTable(table.get("budget", 1000), table.get("idle", 60)), model_id="echo",
                        peer_text=node.peer_id.to_text(), dial=dial, hidden_size=None)
    svc.register(node)
    await nursery.start(svc.run)
    return node, port, svc


async def _enter(node: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with node:
        task_status.started()
        await trio.sleep_forever()


def _blob(value: float, seq: int = 1) -> Any:
    import torch

    from pymesh.model.blobs import tensor_to_blob

    return tensor_to_blob(torch.full((1, seq, 4), value))


def test_steps_flow_worker_to_worker_in_order() -> None:
    from pymesh.net.rpc import RemoteError, RpcNode

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            n1, p1, s1 = await _start(nursery, 0, 2)
            n2, p2, s2 = await _start(nursery, 2, 4, budget=50)
            client = RpcNode(Identity.generate(), transport="tcp")
            await nursery.start(_enter, client)
            inbox = Inbox()
            client.on_push(wire.OUT, inbox.handler(wire.OUT))
            client.on_push(wire.ERR, inbox.handler(wire.ERR))
            c1 = await client.connect("127.0.0.1", p1, n1.peer_id)
            c2 = await client.connect("127.0.0.1", p2, n2.peer_id)
            sid = b"s" * 16
            # Refused: the second worker's budget is 50 tokens.
            with pytest.raises(RemoteError) as info:
                await c2.call(wire.OPEN, {"sid": sid, "max_tokens": 64})
            assert info.value.code == "refused"
            await c2.call(wire.OPEN, {"sid": sid, "max_tokens": 40})
            nxt = {"peer": n2.peer_id.key, "host": "127.0.0.1", "port": p2, "transport": "tcp"}
            await c1.call(wire.OPEN, {"sid": sid, "max_tokens": 40, "next": nxt})
            # Step 1 arrives before step 0: it waits for it, then both flow on in order.
            await c1.push(wire.STEP, {"sid": sid, "step": 1, "pos": 3}, [_blob(1.0)])
            await trio.sleep(0.2)
            assert inbox.items == []
            await c1.push(wire.STEP, {"sid": sid, "step": 0, "pos": 0}, [_blob(0.0, 3)])
            await inbox.wait(4)
            outs = [(m["start"], m["step"]) for t, _, m, _ in inbox.items if t == wire.OUT]
            assert sorted(outs) == [(0, 0), (0, 1), (2, 0), (2, 1)]
            # A retry of the last step is served again; an older step is rejected.
            await c1.push(wire.STEP, {"sid": sid, "step": 1, "pos": 3}, [_blob(1.0)])
            await inbox.wait(6)
            await c1.push(wire.STEP, {"sid": sid, "step": 0, "pos": 0}, [_blob(0.0, 3)])
            await inbox.wait(7)
            topic, _, meta, _ = inbox.items[-1]
            assert topic == wire.ERR and b"stale" in meta["msg"]
            st1, _ = await c1.call(wire.STATS, {"sid": sid})
            st2, _ = await c2.call(wire.STATS, {"sid": sid})
            assert st1["s_from_client"] == 4 and st1["s_from_peer"] == 0
            assert st2["s_from_client"] == 0 and st2["s_from_peer"] == 3 and st2["s_steps"] == 2
            # Replay through pm.forward rebuilds a fresh session step by step.
            await c2.call(wire.OPEN, {"sid": sid, "max_tokens": 40, "reset": 1})
            _, out = await c2.call(wire.FORWARD, {"sid": sid, "step": 0, "pos": 0}, [_blob(7.0, 3)])
            assert tuple(out[0].shape) == (1, 3, 4)
            with pytest.raises(RemoteError, match="starts at position"):
                await c2.call(wire.FORWARD, {"sid": sid, "step": 1, "pos": 5}, [_blob(7.0)])
            closed, _ = await c2.call(wire.CLOSE, {"sid": sid})
            assert closed["closed"] == 1 and closed["free"] == 50
            nursery.cancel_scope.cancel()

    trio.run(main)


_meta = st.recursive(
    st.one_of(st.integers(-5, 70000), st.binary(max_size=40), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["next", "sid", "step", "x"]), _meta, max_size=4))
def test_wire_readers_raise_only_bad_request(meta: dict[str, Any]) -> None:
    for read in (wire.decode_next, lambda m: wire.get_bytes(m, "sid"), lambda m: wire.get_int(m, "step")):
        try:
            read(meta)
        except wire.BadRequest:
            pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, 5000), max_size=5))
def test_hidden_shape_check_raises_only_bad_request(shape: list[int]) -> None:
    try:
        seq = wire.check_hidden_shape(tuple(shape), 576, 128)
    except wire.BadRequest:
        return
    assert 0 < seq <= 128 and len(shape) == 3
