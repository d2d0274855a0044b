"""The worker service in-process: step order, retries, pushes along the route, errors.

Two echo workers and a client, each an RpcNode over TCP on loopback in one trio run.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.proto import session_wire as wire
from pymesh.proto.identity import Identity, PeerID
from pymesh.proto.session_wire import AddrHint, NextHop
from pymesh.proto.vocab import Transport
from pymesh.worker.directory import NextAddr
from pymesh.worker.runtime import load_runtime
from pymesh.worker.sessions import SessionTable
from tests.worker.harness import enter as _enter
from tests.worker.harness import Directory
from tests.worker.harness import blob as _blob

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


async def _start(nursery: trio.Nursery, start: int, stop: int, directory: Directory | None = None,
                 **table: Any) -> Any:
    from pymesh.net.rpc import RpcNode
    from pymesh.worker.service import WorkerService

    directory = directory or Directory()
    node = RpcNode(Identity.generate(), transport="tcp")
    await nursery.start(_enter, node)
    port = await node.listen("127.0.0.1", 0)
    directory.entries[node.peer_id] = (start, stop, NextAddr(node.peer_id, "127.0.0.1", port, Transport.TCP))

    async def dial(transport: Transport, host: str, p: int, peer: PeerID) -> Any:
        directory.dialled.append(NextAddr(peer, host, p, transport))
        return await node.connect(host, p, peer)

    svc = WorkerService(load_runtime(None, start, stop, device="cpu", dtype_name="float32"),
                        SessionTable(table.get("budget", 1000), table.get("idle", 60)), model_id="echo",
                        peer=node.peer_id, dial=dial, resolve_next=directory, hidden_size=None)
    svc.register(node)
    await nursery.start(svc.run)
    return node, port, svc


def test_steps_flow_worker_to_worker_in_order() -> None:
    from pymesh.net.rpc import RemoteError, RpcNode

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            directory = Directory()
            n1, p1, s1 = await _start(nursery, 0, 2, directory)
            n2, p2, s2 = await _start(nursery, 2, 4, directory, budget=50)
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
            await c2.call(wire.OPEN, {"sid": sid, "max_tokens": 40, "prev": n1.peer_id.key})
            # The hint names another address: the worker dials what the directory says.
            nxt = NextHop(n2.peer_id, 2, 4, AddrHint("10.9.9.9", 1, Transport.TCP))
            await c1.call(wire.OPEN, wire.Open(sid, 40, next_hop=nxt).to_meta())
            assert directory.dialled[-1] == NextAddr(n2.peer_id, "127.0.0.1", p2, Transport.TCP)
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
    for read in (wire.SetNext.from_meta_untrusted, lambda m: wire.get_bytes(m, "sid"),
                 lambda m: wire.get_int(m, "step")):
        try:
            read(meta)
        except wire.BadRequest:
            pass


def test_next_hop_without_a_verified_record_is_refused_naming_the_peer() -> None:
    from pymesh.net.rpc import RemoteError, RpcNode

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            directory = Directory()
            n1, p1, s1 = await _start(nursery, 0, 2, directory)
            n2, p2, s2 = await _start(nursery, 2, 4, Directory())   # announced nowhere n1 can see
            client = RpcNode(Identity.generate(), transport="tcp")
            await nursery.start(_enter, client)
            c1 = await client.connect("127.0.0.1", p1, n1.peer_id)
            sid = b"n" * 16
            # The request names n2 and even its right address: not enough without n2's record.
            hint = AddrHint("127.0.0.1", p2, Transport.TCP)
            with pytest.raises(RemoteError) as info:
                await c1.call(wire.OPEN, wire.Open(sid, 8, next_hop=NextHop(n2.peer_id, 2, 4, hint)).to_meta())
            assert info.value.code == wire.ErrorCode.NEXT_UNKNOWN and str(n2.peer_id) in info.value.message
            assert directory.dialled == [] and s1.table.sessions == {}   # nothing dialled, nothing reserved
            # A next hop that does not continue this worker's span is a bad request.
            with pytest.raises(RemoteError) as info:
                await c1.call(wire.OPEN, wire.Open(sid, 8, next_hop=NextHop(n2.peer_id, 3, 4)).to_meta())
            assert info.value.code == wire.ErrorCode.BAD_REQUEST and "blocks after" in info.value.message
            # set_next resolves the same way; the session keeps its old route on failure.
            await c1.call(wire.OPEN, wire.Open(sid, 8).to_meta())
            with pytest.raises(RemoteError) as info:
                await c1.call(wire.SET_NEXT, wire.SetNext(sid, NextHop(n2.peer_id, 2, 4, hint)).to_meta())
            assert info.value.code == wire.ErrorCode.NEXT_UNKNOWN
            assert s1.table.sessions[sid].next_addr is None
            directory.entries[n2.peer_id] = (2, 4, NextAddr(n2.peer_id, "127.0.0.1", p2, Transport.TCP))
            await c1.call(wire.SET_NEXT, wire.SetNext(sid, NextHop(n2.peer_id, 2, 4)).to_meta())
            assert s1.table.sessions[sid].next_addr == directory.entries[n2.peer_id][2]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_idle_sessions_expire_on_the_injected_clock() -> None:
    """No sockets: the service's expiry loop under trio's virtual clock (30 s take no time)."""
    from pymesh.net.clock import TrioClock
    from pymesh.worker.service import WorkerService

    async def never(*args: Any) -> Any:
        raise AssertionError("nothing is dialled in this test")

    async def main() -> None:
        clock = TrioClock()
        svc = WorkerService(load_runtime(None, 0, 2, device="cpu", dtype_name="float32"),
                            SessionTable(100, idle_timeout=30), model_id="echo", peer=PeerID(b"w" * 32),
                            dial=never, resolve_next=never, hidden_size=None, clock=clock)
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            svc.table.open(b"e", PeerID(b"c" * 32), 8, 1, None, clock.monotonic()).stepped = True  # in use
            await trio.sleep(20)
            assert len(svc.table.sessions) == 1
            svc.table.get(b"e", clock.monotonic())        # used: the idle time starts again
            await trio.sleep(25)
            assert len(svc.table.sessions) == 1
            await trio.sleep(10)
            assert svc.table.sessions == {} and svc.table.expired == 1
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_forward_rows_buckets_are_cumulative_with_an_inf_bucket() -> None:
    from pymesh.worker.datapath import Buckets

    b = Buckets((1, 4, 16))
    for v in (1, 1, 3, 16, 17, 5000):
        b.observe(v)
    assert b.cumulative() == [("1", 2), ("4", 3), ("16", 4), ("+Inf", 6)]
    assert b.total == 1 + 1 + 3 + 16 + 17 + 5000
