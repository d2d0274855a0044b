"""An in-process echo swarm for client tests on trio's virtual clock (no sockets).

:class:`SimSwarm` is a real :class:`~pymesh.client.swarm.Swarm` (discovery, bans, routing
and push parsing are the production code) whose DHT reads and worker calls are answered by
simulated echo workers. Every worker keeps our session's state as a worker would (steps
done, next hop, previous hop); pushed steps travel hop to hop in tasks of ``nursery`` and
come back as ``pm.out`` / ``pm.err`` through the Swarm's own push handlers.

Faults a test can inject: a worker that is down (calls time out), a broken link from one
worker to its next (``"report"``: the push fails and the sender reports a link failure;
``"vanish"``: the push disappears), a restart (the session is lost, the predecessor's link
goes stale, a newer record is announced), a wrong output, arbitrary ``pm.err`` pushes, a
worker refusing every session (``refuse``: an error code) and next hops a worker does not
know (``unknown_next``: ``next_unknown``, as with allowlists that differ between workers).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
import trio

from pymesh.client.routing import SpanOption
from pymesh.client.swarm import Request, Swarm
from pymesh.errors import PeerUnavailable
from pymesh.model.blobs import blob_to_tensor, tensor_to_blob
from pymesh.net.conn import RemoteError
from pymesh.proto import session_wire as sw
from pymesh.proto.frames import Meta, TensorBlob
from pymesh.proto.identity import PeerID
from pymesh.proto.records import WorkerRecord
from pymesh.settings import ClientSettings, Settings

BOOT = ["127.0.0.1:9"]


def peer(n: int) -> PeerID:
    return PeerID(bytes([n]) * 32)


def record(n: int, start: int, stop: int, ts: float = 1000.0, **kw: Any) -> WorkerRecord:
    kw.setdefault("cache_tokens_free", 10_000)
    return WorkerRecord(peer_id=peer(n), model_id="m", start=start, stop=stop, host="127.0.0.1", port=1000 + n,
                        timestamp=ts, **kw)


def settings(**client: Any) -> Settings:
    """Client settings for simulated workers; they sign no receipts, so verification is off
    (tests/client/test_verify_inprocess.py covers it with real workers)."""
    base: dict[str, Any] = dict(copy_every=1, probe_after=2.0, probe_timeout=3.0, step_timeout=60.0,
                                discovery_timeout=20.0, rpc_timeout=5.0, ban_seconds=60.0, verify="off")
    base.update(client)
    return Settings(client=ClientSettings(**base))


@dataclass
class SimSession:
    steps: int
    next_hop: sw.NextHop | None
    prev: PeerID | None
    copies: int


@dataclass
class SimWorker:
    n: int
    start: int
    stop: int
    down: bool = False
    sessions: dict[bytes, SimSession] = field(default_factory=dict)
    #: the link to the next worker: None (fine), "report" or "vanish"
    broken: str | None = None
    #: output = f(input): the identity for an honest echo worker
    compute: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    #: pm.open answers this error code (e.g. ``not_listed``: its allowlist does not list us)
    refuse: sw.ErrorCode | None = None
    #: next hops this worker has no record of it trusts (pm.open/pm.set_next: ``next_unknown``)
    unknown_next: set[PeerID] = field(default_factory=set)

    @property
    def peer(self) -> PeerID:
        return peer(self.n)


class _Conn:
    def __init__(self, p: PeerID) -> None:
        self.peer = p


class FakeDHT:
    """The DHT reads a Swarm makes, answered by ``read(block)`` (all records of the model
    the read would see, offline ones included; ``block``: the read is for that block)."""

    def __init__(self, read: Callable[[int | None], list[WorkerRecord]]) -> None:
        self.read = read
        self.reads: list[int | None] = []
        self.core = SimpleNamespace(routing=[None])

    async def list_records(self, model_id: str | None = None) -> list[WorkerRecord]:
        self.reads.append(None)
        return self.read(None)

    async def find_model_records(self, model_id: str) -> list[WorkerRecord]:
        self.reads.append(None)
        return [r for r in self.read(None) if r.live]

    async def find_block_providers(self, model_id: str, block: int) -> list[WorkerRecord]:
        self.reads.append(block)
        return [r for r in self.read(block) if r.live and r.covers(block)]

    async def list_models(self) -> list[str]:
        return ["m"]


class SimSwarm(Swarm):
    def __init__(self, workers: Sequence[SimWorker], *, records: Sequence[WorkerRecord] | None = None,
                 **kw: Any) -> None:
        super().__init__(BOOT, "m", **kw)
        self.workers = {w.peer: w for w in workers}
        self.published = list(records) if records is not None else [record(w.n, w.start, w.stop) for w in workers]
        self.calls: list[tuple[float, PeerID, Any]] = []
        self.nursery: trio.Nursery | None = None
        self._dht = FakeDHT(lambda block: list(self.published))  # type: ignore[assignment]

    # -- discovery -------------------------------------------------------------------------

    async def measure_rtts(self, options: Sequence[SpanOption]) -> None:
        return None

    def restart(self, n: int, *, at: float) -> None:
        """Worker ``n`` restarts: sessions gone, its predecessors' links stale, a newer record."""
        w = self.workers[peer(n)]
        w.sessions.clear()
        w.down = False
        for other in self.workers.values():
            if any(s.next_hop is not None and s.next_hop.peer == w.peer for s in other.sessions.values()):
                other.broken = other.broken or "vanish"
        self.published = [replace(r, timestamp=at) if r.peer_id == w.peer else r for r in self.published]

    # -- calls -----------------------------------------------------------------------------
    async def request(self, option: SpanOption, message: Request, tensors: Sequence[TensorBlob] = (),
                      *, timeout: float | None = None) -> tuple[Meta, list[TensorBlob]]:
        t = timeout if timeout is not None else self.rpc_timeout
        w = self.workers[option.peer]
        self.calls.append((trio.current_time(), w.peer, message))
        if w.down:
            await trio.sleep(t)
            raise PeerUnavailable(f"worker {w.peer.short()} did not answer {message.METHOD} within {t:.0f} s")
        await trio.sleep(0.001)
        if isinstance(message, sw.Info):
            return {}, []
        if isinstance(message, (sw.Open, sw.SetNext)) and message.next_hop is not None \
                and message.next_hop.peer in w.unknown_next:
            raise RemoteError(sw.ErrorCode.NEXT_UNKNOWN, f"no verified record of peer {message.next_hop.peer}")
        if isinstance(message, sw.Open):
            if w.refuse is not None:
                raise RemoteError(w.refuse, f"worker {w.n} refuses ({w.refuse.value})")
            w.sessions[message.sid] = SimSession(0, message.next_hop, message.prev, message.copies)
            return sw.OpenReply(w.start, w.stop, 1000).to_meta(), []
        s = w.sessions.get(getattr(message, "sid", b""))
        if s is None:
            raise RemoteError(sw.ErrorCode.NOT_FOUND, "no such session")
        if isinstance(message, sw.SetNext):
            s.next_hop = message.next_hop
            s.prev = message.prev if message.prev is not None else s.prev
            w.broken = None  # re-dialled
            return sw.Empty().to_meta(), []
        if isinstance(message, sw.Close):
            del w.sessions[message.sid]
            return sw.CloseReply(True, 1000).to_meta(), []
        if isinstance(message, sw.CheckLink):
            ok = s.next_hop is None or w.broken is None
            return sw.CheckLinkReply(ok, "fine" if ok else "next hop does not answer").to_meta(), []
        if isinstance(message, sw.Stats):
            counters = sw.SessionCounters(0, 0, s.steps, 0)
            return sw.StatsReply(0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, w.start, w.stop, counters).to_meta(), []
        if isinstance(message, sw.Flush):
            return sw.FlushReply((), w.start, w.stop).to_meta(), []
        if isinstance(message, sw.Forward):
            s.steps = max(s.steps, message.step + 1)
            return {}, [tensor_to_blob(w.compute(blob_to_tensor(tensors[0])).contiguous())]
        raise AssertionError(f"unexpected call {message!r}")

    async def connect(self, option: SpanOption) -> Any:
        w = self.workers[option.peer]
        if w.down:
            raise PeerUnavailable(f"cannot connect to {w.peer.short()}")
        swarm = self

        class Conn:
            async def push(self, topic: str, meta: Meta, tensors: Sequence[TensorBlob]) -> None:
                assert topic == sw.STEP
                assert swarm.nursery is not None
                swarm.nursery.start_soon(swarm._deliver, None, w, sw.Step.from_meta_untrusted(meta), tensors[0])

        return Conn()

    async def _deliver(self, sender: SimWorker | None, w: SimWorker, step: sw.Step, blob: TensorBlob) -> None:
        await trio.sleep(0.01)
        if w.down:
            return
        s = w.sessions.get(step.sid)
        if s is None:
            target = sender.peer if sender is not None else w.peer
            err = sw.Err(step.sid, step.step, sw.ErrorCode.NOT_FOUND, "no such session", w.start, w.stop)
            if sender is None:
                await self._on_err(_Conn(w.peer), err.to_meta(), [])
            else:   # the sender relays it, blaming us
                relayed = replace(err, start=sender.start, stop=sender.stop, blame=w.peer)
                await self._on_err(_Conn(target), relayed.to_meta(), [])
            return
        if s.prev is not None and (sender is None or s.prev != sender.peer):
            return  # steps only from the bound previous hop
        s.steps = max(s.steps, step.step + 1)
        out = tensor_to_blob(w.compute(blob_to_tensor(blob)).contiguous())
        final = s.next_hop is None
        if not final:
            assert s.next_hop is not None
            nxt = self.workers[s.next_hop.peer]
            if nxt.peer in w.unknown_next:   # as a worker whose allowlist lacks its next hop
                err = sw.Err(step.sid, step.step, sw.ErrorCode.NEXT_UNKNOWN, "not on this worker's allowlist",
                             w.start, w.stop, blame=nxt.peer)
                await self._on_err(_Conn(w.peer), err.to_meta(), [])
                return
            if w.broken == "report":
                err = sw.Err(step.sid, step.step, sw.ErrorCode.NEXT_UNREACHABLE, "connection reset", w.start,
                             w.stop, blame=nxt.peer, link=True)
                await self._on_err(_Conn(w.peer), err.to_meta(), [])
                return
            if w.broken is None:
                self.nursery.start_soon(self._deliver, w, nxt, step, out)  # type: ignore[union-attr]
        msg = sw.Out(step.sid, step.step, (step.step,), final, w.start, w.stop)
        await self._on_out(_Conn(w.peer), msg.to_meta(), [out])

    def opened(self, n: int) -> list[sw.Open]:
        return [m for _, p, m in self.calls if p == peer(n) and isinstance(m, sw.Open)]

    def calls_of(self, kind: type, n: int | None = None) -> list[Any]:
        return [m for _, p, m in self.calls if isinstance(m, kind) and (n is None or p == peer(n))]
