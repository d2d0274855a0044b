"""In-process echo workers and clients that talk over trio memory streams (no sockets).

Run under trio's virtual clock (``run``): timeouts, lapses and idle expiry take no real
time. ``Directory`` stands in for the DHT's verified records; a test can make it lie (a
stale record) to build routes no honest swarm would. Also used by tests/hostile.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import trio
import trio.testing

from pymesh.errors import PeerUnavailable
from pymesh.net.clock import TrioClock
from pymesh.net.rpc import Connection, RpcNode
from pymesh.proto import session_wire as wire
from pymesh.proto.identity import Identity, PeerID
from pymesh.proto.session_wire import NextHop
from pymesh.proto.vocab import Transport
from pymesh.worker.directory import NextAddr
from pymesh.worker.runtime import Runtime, load_runtime
from pymesh.worker.sessions import SessionTable


def run(main: Callable[[], Awaitable[None]]) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class Directory:
    """Stands in for the DHT: the addresses workers announced, by peer and span."""

    def __init__(self) -> None:
        self.entries: dict[PeerID, tuple[int, int, NextAddr]] = {}
        self.dialled: list[NextAddr] = []

    async def __call__(self, hop: NextHop) -> NextAddr | None:
        entry = self.entries.get(hop.peer)
        if entry is None or not entry[0] == hop.start < hop.stop <= entry[1]:
            return None
        return entry[2]


class Inbox:
    """Pushes a client received, by topic."""

    def __init__(self) -> None:
        self.items: list[tuple[str, PeerID, dict[str, Any]]] = []
        self.tensors: list[list[Any]] = []   # the tensors of each item, by index
        self.changed = trio.Event()

    def attach(self, node: RpcNode) -> None:
        for topic in (wire.OUT, wire.ERR):
            node.on_push(topic, self._handler(topic))

    def _handler(self, topic: str) -> Any:
        async def on(conn: Connection, meta: dict[str, Any], tensors: list[Any]) -> None:
            self.items.append((topic, conn.peer, dict(meta)))
            self.tensors.append(list(tensors))
            self.changed.set()
            self.changed = trio.Event()

        return on

    def errors(self) -> list[wire.Err]:
        return [wire.Err.from_meta_untrusted(m) for t, _, m in self.items if t == wire.ERR]

    def outs(self) -> list[wire.Out]:
        return [wire.Out.from_meta_untrusted(m) for t, _, m in self.items if t == wire.OUT]

    def outs_of(self, start: int) -> list[tuple[wire.Out, list[Any]]]:
        """The pm.out pushes of the hop starting at block ``start``, with their tensors."""
        return [(wire.Out.from_meta_untrusted(m), self.tensors[i]) for i, (t, _, m) in enumerate(self.items)
                if t == wire.OUT and m["start"] == start]

    async def wait(self, n: int, timeout: float = 30) -> None:
        with trio.fail_after(timeout):
            while len(self.items) < n:
                await self.changed.wait()


class SlowRuntime(Runtime):
    """An echo runtime whose every forward pass takes ``delay`` (virtual) seconds."""

    def __init__(self, echo: Runtime, delay: float) -> None:
        super().__init__(echo.span)
        self.delay = delay

    async def run(self, fn: Callable[[], Any]) -> Any:
        await trio.sleep(self.delay)
        return fn()


@dataclass
class MemNet:
    """Nodes that dial each other by peer id over memory streams, in one nursery."""

    nursery: trio.Nursery
    nodes: dict[PeerID, RpcNode] = field(default_factory=dict)
    down: set[PeerID] = field(default_factory=set)

    async def node(self, identity: Identity | None = None) -> RpcNode:
        node = RpcNode(identity or Identity.generate(), transport="tcp")
        await self.nursery.start(enter, node)
        self.nodes[node.peer_id] = node
        return node

    async def connect(self, src: RpcNode, peer: PeerID) -> Connection:
        for conn in src.connections():
            if conn.peer == peer:
                return conn
        dst = self.nodes.get(peer)
        if dst is None or peer in self.down:
            raise PeerUnavailable(f"nobody answers as {peer.short()}")
        a, b = trio.testing.memory_stream_pair()
        self.nursery.start_soon(dst.serve_stream, b)
        return await src.connect_stream(a, peer)

    async def worker(self, start: int, stop: int, directory: Directory, *, budget: int = 1000,
                     idle: float = 300, lapse: float = 30, delay: float = 0.0, **kwargs: Any) -> Any:
        """An echo worker serving ``[start, stop)``, announced in ``directory``; returns its service."""
        from pymesh.worker.service import WorkerService

        node = await self.node()
        directory.entries[node.peer_id] = (start, stop, NextAddr(node.peer_id, "mem", 1, Transport.TCP))

        async def dial(transport: Transport, host: str, port: int, peer: PeerID) -> Connection:
            directory.dialled.append(NextAddr(peer, host, port, transport))
            return await self.connect(node, peer)

        rt = load_runtime(None, start, stop, device="cpu", dtype_name="float32")
        if "signer" in inspect.signature(WorkerService).parameters:  # code before issue 12 has none
            kwargs.setdefault("signer", node.identity)
        if delay:
            rt = SlowRuntime(rt, delay)
        svc = WorkerService(rt, _table(budget, idle, lapse), model_id="echo", peer=node.peer_id,
                            dial=dial, resolve_next=directory, hidden_size=None, clock=TrioClock(), **kwargs)
        svc.register(node)
        await self.nursery.start(svc.run)
        svc.node = node  # type: ignore[attr-defined]
        return svc

    async def client(self) -> tuple[RpcNode, Inbox]:
        node = await self.node()
        inbox = Inbox()
        inbox.attach(node)
        return node, inbox


def _table(budget: int, idle: float, lapse: float) -> SessionTable:
    try:
        return SessionTable(budget, idle, lapse=lapse)
    except TypeError:  # the code before issue 11 (the benchmark's "before" rows run it too)
        return SessionTable(budget, idle)


async def enter(node: RpcNode, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with node:
        task_status.started()
        await trio.sleep_forever()


def blob(value: float, seq: int = 1) -> Any:
    import torch

    from pymesh.model.blobs import tensor_to_blob

    return tensor_to_blob(torch.full((1, seq, 4), value))


def step(sid: bytes, k: int, pos: int, rc: bytes | None = None) -> dict[str, object]:
    meta = wire.Step(sid, k, pos).to_meta()
    if rc is not None:
        meta["rc"] = rc
    return meta


def open_meta(sid: bytes, tokens: int, *, next_hop: NextHop | None = None, prev: PeerID | None = None,
              copies: int = 1, receipts: bool = False) -> dict[str, object]:
    """``pm.open`` metadata built by hand (so the benchmark's "before" run, whose ``Open`` has no
    ``prev``, sends the same bytes)."""
    meta = wire.Open(sid, tokens, copies=copies, next_hop=next_hop).to_meta()
    if prev is not None:
        meta["prev"] = prev.key
    if receipts:
        meta["rcpt"] = 1
    return meta


def set_next_meta(sid: bytes, next_hop: NextHop | None, prev: PeerID | None) -> dict[str, object]:
    meta = wire.SetNext(sid, next_hop).to_meta()
    if prev is not None:
        meta["prev"] = prev.key
    return meta


async def receipt_route(net: MemNet, directory: Directory, *, copies: int = 1, receipts: bool = True,
                        w1_kwargs: dict[str, Any] | None = None,
                        sid: bytes = b"r" * 16) -> tuple[Any, Any, RpcNode, Inbox]:
    """Client -> W1 (0-2) -> W2 (2-4), one session opened with receipts (``rcpt``) and
    ``prev`` named: (w1, w2, client node, inbox). ``w1_kwargs`` go to W1's service."""
    w1 = await net.worker(0, 2, directory, **(w1_kwargs or {}))
    w2 = await net.worker(2, 4, directory)
    client, inbox = await net.client()
    c1, c2 = await net.connect(client, w1.peer), await net.connect(client, w2.peer)
    await c2.call(wire.OPEN, open_meta(sid, 32, prev=w1.peer, copies=copies, receipts=receipts))
    await c1.call(wire.OPEN, open_meta(sid, 32, next_hop=NextHop(w2.peer, 2, 4), copies=copies, receipts=receipts))
    return w1, w2, client, inbox


def receipt_of(raw: bytes | None) -> Any:
    """The :class:`pymesh.proto.receipts.SignedReceipt` in ``raw`` (which must be present and valid)."""
    from pymesh.proto.receipts import SignedReceipt

    assert raw is not None
    return SignedReceipt.from_wire_untrusted(raw)
