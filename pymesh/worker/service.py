"""A worker's RPC service: inference sessions and the worker-to-worker data path.

One step of a session arrives as a ``pm.step`` push (from the client at the first hop,
from the previous worker after that). The worker checks the step order, runs its span
in the compute thread, pushes the output straight to the next worker of the session's
route, then pushes a copy to the client (``pm.out``): the last hop's copy is the
result, the others are what the client keeps to replay a span after a fault.
Failures go back as ``pm.err`` pushes naming the peer to blame.

Every message is a typed object of :mod:`pymesh.proto.session_wire`. The next hop of a
session is dialled at the address its own verified record announces (``resolve_next``),
never at an address only the request named.
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable, Protocol, TypeVar

import trio

from pymesh import PROTOCOL_VERSION
from pymesh.errors import ConnectionClosed, IdentityError, PeerUnavailable, PymeshError
from pymesh.net.clock import Clock, TrioClock
from pymesh.net.rpc import CallContext, Connection, Meta, RemoteError, RpcNode
from pymesh.proto import session_wire as sw
from pymesh.proto.frames import TensorBlob
from pymesh.proto.identity import PeerID
from pymesh.proto.session_wire import BadRequest, ErrorCode
from pymesh.proto.vocab import Transport, WorkerState
from pymesh.settings import WorkerSettings
from pymesh.worker.directory import NextAddr, NextHopResolver
from pymesh.worker.runtime import Runtime
from pymesh.worker.sessions import Session, SessionError, SessionTable, advance, check_step

log = logging.getLogger(__name__)

Reply = tuple[Meta, list[TensorBlob]]
Call = Callable[[CallContext, Meta, list[TensorBlob]], Awaitable[Reply]]
T = TypeVar("T")

#: errors of dialling or pushing to the next hop: it is unreachable (or not who its record says)
_HOP_ERRORS = (PeerUnavailable, ConnectionClosed, IdentityError, trio.TooSlowError, OSError)
#: a push back to the client failed: it went away, or this node already closed its connection
_GONE = (PeerUnavailable, ConnectionClosed)


class Dial(Protocol):
    async def __call__(self, transport: Transport, host: str, port: int, peer: PeerID) -> Connection:
        """An authenticated connection to ``peer`` (pinned key) at ``host:port``."""
        ...


class WorkerService:
    def __init__(
        self,
        runtime: Runtime,
        table: SessionTable,
        *,
        model_id: str,
        peer: PeerID,
        dial: Dial,
        resolve_next: NextHopResolver,
        hidden_size: int | None,
        settings: WorkerSettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.runtime = runtime
        self.table = table
        self.model_id = model_id
        self.peer = peer
        self._dial = dial
        self._resolve_next = resolve_next
        self.hidden_size = hidden_size
        self.settings = settings or WorkerSettings()
        self.clock: Clock = clock or TrioClock()
        self.state = WorkerState.JOINING
        self.counters = {"from_client": 0, "from_peer": 0, "steps": 0, "replayed": 0, "errors": 0,
                         "compute_us": 0}
        self._nursery: trio.Nursery | None = None
        self._progress: dict[bytes, trio.Event] = {}

    # -- wiring ----------------------------------------------------------------------------
    def register(self, node: RpcNode) -> None:
        node.register(sw.INFO, self._wrap(self.info))
        node.register(sw.OPEN, self._wrap(self.open))
        node.register(sw.SET_NEXT, self._wrap(self.set_next))
        node.register(sw.CLOSE, self._wrap(self.close))
        node.register(sw.FORWARD, self._wrap(self.forward))
        node.register(sw.STATS, self._wrap(self.stats))
        node.register(sw.FLUSH, self._wrap(self.flush))
        node.on_push(sw.STEP, self.on_step)
        node.on_push(sw.ERR, self.on_relayed_error)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Owns the tasks that process pushed steps and expires idle sessions."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(min(1.0, max(self.table.idle_timeout / 4, 0.05)))
                for sid in self.table.expire(self.clock.monotonic()):
                    log.info("session %s expired after %.0f s idle; cache freed", sid.hex()[:8],
                             self.table.idle_timeout)

    def swap_runtime(self, runtime: Runtime) -> int:
        """Serve another span (placement moved us); open sessions are dropped."""
        self.runtime = runtime
        return self.table.clear()

    @staticmethod
    def _wrap(fn: Call) -> Call:
        async def handler(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> Reply:
            try:
                return await fn(ctx, meta, tensors)
            except SessionError as exc:
                raise RemoteError(exc.code, exc.message) from None
            except BadRequest as exc:
                raise RemoteError(ErrorCode.BAD_REQUEST, str(exc)) from None
            except PymeshError as exc:
                if isinstance(exc, RemoteError):
                    raise
                raise RemoteError(ErrorCode.BAD_REQUEST, f"{type(exc).__name__}: {exc}") from None

        return handler

    # -- calls -----------------------------------------------------------------------------
    async def info(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> Reply:
        sw.Info.from_meta_untrusted(meta)
        return sw.InfoReply(
            peer=self.peer, model=self.model_id, start=self.runtime.start, stop=self.runtime.stop,
            version=PROTOCOL_VERSION, state=self.state, free=self.table.free_tokens,
            total=self.table.budget_tokens, sessions=len(self.table.sessions),
        ).to_meta(), []

    async def open(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> Reply:
        if self.state == WorkerState.OFFLINE:
            raise SessionError(ErrorCode.REFUSED, "this worker is shutting down; use another one")
        req = sw.Open.from_meta_untrusted(meta)
        if req.model is not None and req.model != self.model_id:
            raise SessionError(ErrorCode.BAD_REQUEST, f"this worker serves {self.model_id}, not {req.model}")
        rt = self.runtime
        start = rt.start if req.start is None else req.start
        stop = rt.stop if req.stop is None else req.stop
        if (start, stop) != (rt.start, rt.stop):
            raise SessionError(
                ErrorCode.REFUSED,
                f"this worker serves blocks {rt.start}-{rt.stop - 1}, not {start}-{stop - 1} (it moved); "
                "look up the swarm again",
            )
        old = self.table.sessions.get(req.sid)
        if old is not None and req.reset and old.client == ctx.peer:
            self.table.close(req.sid)  # a fresh session under a reused id (the client re-routed back here)
        prev = self.table.sessions.get(req.sid)
        route = (prev.next_hop, prev.next_addr) if prev is not None else (None, None)
        s = self.table.open(req.sid, ctx.peer, req.max_tokens, req.batch, req.next_hop, self.clock.monotonic())
        s.client_conn = ctx.connection
        s.copy_every = req.copies
        try:
            if prev is None:
                s.cache = await rt.run(lambda: rt.new_cache(req.max_tokens, req.batch))
            s.next_addr = await self._connect_next(req.next_hop)
        except BaseException:
            if prev is None:
                self.table.close(req.sid)  # a session that cannot reach its next hop reserves nothing
            else:
                s.next_hop, s.next_addr = route  # a failed re-open leaves the session's route as it was
            raise
        log.info("session %s opened (%d tokens x %d) -> %s", req.sid.hex()[:8], req.max_tokens, req.batch,
                 s.next_addr.describe() if s.next_addr else "client")
        return sw.OpenReply(rt.start, rt.stop, self.table.free_tokens).to_meta(), []

    async def _connect_next(self, hop: sw.NextHop | None) -> NextAddr | None:
        """Resolve ``hop`` to its verified record's address and dial it (``None``: last hop)."""
        if hop is None:
            return None
        if hop.start != self.runtime.stop:
            raise BadRequest(f"the next hop must serve the blocks after this worker's (from {self.runtime.stop}), "
                             f"not {hop.start}-{hop.stop - 1}")
        addr = await self._resolve_next(hop)
        if addr is None:
            raise RemoteError(
                ErrorCode.NEXT_UNKNOWN,
                f"no verified record of peer {hop.peer} serving {self.model_id} blocks "
                f"{hop.start}-{hop.stop - 1}; this worker dials only addresses a peer announced itself",
            )
        try:
            with trio.fail_after(self.settings.next_hop_timeout):
                await self._dial(addr.transport, addr.host, addr.port, addr.peer)
        except _HOP_ERRORS as exc:
            raise RemoteError(ErrorCode.NEXT_UNREACHABLE,
                              f"cannot reach the next worker {addr.describe()}: {exc}") from None
        return addr

    async def set_next(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> Reply:
        req = sw.SetNext.from_meta_untrusted(meta)
        s = self._own_session(ctx, req.sid)
        addr = await self._connect_next(req.next_hop)
        s.next_hop, s.next_addr = req.next_hop, addr
        return sw.Empty().to_meta(), []

    async def close(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> Reply:
        sid = sw.Close.from_meta_untrusted(meta).sid
        s = self.table.sessions.get(sid)
        closed = s is not None and s.client == ctx.peer and self.table.close(sid)
        return sw.CloseReply(bool(closed), self.table.free_tokens).to_meta(), []

    async def stats(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> Reply:
        req = sw.Stats.from_meta_untrusted(meta)
        s = self.table.sessions.get(req.sid) if req.sid is not None else None
        c, t = self.counters, self.table
        return sw.StatsReply(
            from_client=c["from_client"], from_peer=c["from_peer"], steps=c["steps"], replayed=c["replayed"],
            errors=c["errors"], compute_us=c["compute_us"], sessions=len(t.sessions), free=t.free_tokens,
            total=t.budget_tokens, expired=t.expired, refused=t.refused, start=self.runtime.start,
            stop=self.runtime.stop,
            session=None if s is None else sw.SessionCounters(s.from_client, s.from_peer, s.next_step, s.replayed),
        ).to_meta(), []

    async def flush(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> Reply:
        """Hand over the recovery copies not yet pushed to the client (it is recovering)."""
        s = self._own_session(ctx, sw.Flush.from_meta_untrusted(meta).sid)
        steps = sorted(s.pending)
        outs = [s.pending.pop(k) for k in steps]
        return sw.FlushReply(tuple(steps), self.runtime.start, self.runtime.stop).to_meta(), outs

    async def forward(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> Reply:
        """Replay one step of a session (rebuilds the cache); the output goes back, not on."""
        req = sw.Forward.from_meta_untrusted(meta)
        s = self._own_session(ctx, req.sid)
        out = await self._compute(s, req, tensors)
        s.replayed += 1
        self.counters["replayed"] += 1
        return sw.Empty().to_meta(), [out]

    def _own_session(self, ctx: CallContext, sid: bytes) -> Session:
        s = self.table.get(sid, self.clock.monotonic())
        if s.client != ctx.peer:
            raise SessionError(ErrorCode.BAD_REQUEST, "only the client that opened a session may change it")
        return s

    # -- the data path ---------------------------------------------------------------------
    async def _compute(self, s: Session, req: sw.StepRef, tensors: list[TensorBlob]) -> TensorBlob:
        from pymesh.model.blobs import blob_to_tensor, tensor_to_blob

        sw.check_tensor_count(tensors, 1, "a step")
        seq = sw.check_hidden_shape(tuple(tensors[0].shape), self.hidden_size, s.max_tokens, s.batch)
        with trio.move_on_after(self.settings.step_wait):
            while check_step(s, req.step, req.pos, seq) == "future":
                await self._progress.setdefault(s.sid, trio.Event()).wait()
        if check_step(s, req.step, req.pos, seq) == "future":
            raise SessionError(ErrorCode.BAD_REQUEST, f"step {req.step} arrived but step {s.next_step} never did")
        x = blob_to_tensor(tensors[0])
        rt = self.runtime
        s.busy = True
        t0 = time.perf_counter()
        try:
            y = await rt.run(lambda: rt.forward(x, s.cache, req.pos))
        finally:
            self.counters["compute_us"] += int((time.perf_counter() - t0) * 1e6)
            s.busy = False
            s.last_used = self.clock.monotonic()
        advance(s, req.step, req.pos, seq)
        self.counters["steps"] += 1
        event = self._progress.pop(s.sid, None)
        if event is not None:
            event.set()
        return tensor_to_blob(y)

    async def on_step(self, conn: Connection, meta: Meta, tensors: list[TensorBlob]) -> None:
        if self._nursery is None:
            return
        self._nursery.start_soon(self._process_step, conn, meta, tensors)

    async def _process_step(self, conn: Connection, meta: Meta, tensors: list[TensorBlob]) -> None:
        sid, step = _best_effort_ids(meta)
        s: Session | None = None
        try:
            req = sw.Step.from_meta_untrusted(meta)
            s = self.table.get(req.sid, self.clock.monotonic())
            if conn.peer == s.client:
                s.from_client += 1
                self.counters["from_client"] += 1
            else:
                s.from_peer += 1
                self.counters["from_peer"] += 1
            out = await self._compute(s, req, tensors)
        except PymeshError as exc:  # SessionError, BadRequest and the rest
            code = exc.code if isinstance(exc, SessionError) else ErrorCode.BAD_REQUEST
            self.counters["errors"] += 1
            log.warning("step %d of session %s failed: %s", step, sid.hex()[:8], exc)
            target = s.client_conn if s is not None and s.client_conn is not None else conn
            await self._report(target, sid, step, code, str(exc), blame=None)
            return
        if s.next_addr is not None:
            addr = s.next_addr
            try:
                with trio.fail_after(self.settings.next_hop_timeout):
                    nconn = await self._dial(addr.transport, addr.host, addr.port, addr.peer)
                    await nconn.push(sw.STEP, req.to_meta(), [out])
            except _HOP_ERRORS as exc:
                log.warning("cannot push step %d to next worker %s: %s", step, addr.describe(), exc)
                await self._report(s.client_conn, sid, step, ErrorCode.NEXT_UNREACHABLE,
                                   f"next worker unreachable: {exc}", blame=addr.peer)
                return
        # The result (last hop) goes to the client at once; other hops batch their recovery
        # copies (the client fetches the unsent ones with pm.flush when it needs them).
        final = s.next_addr is None
        if not final:
            s.pending[step] = out
            if len(s.pending) < s.copy_every:
                return
        steps = [step] if final else sorted(s.pending)
        outs = [out] if final else [s.pending.pop(k) for k in steps]
        if s.client_conn is not None:
            msg = sw.Out(sid, step, tuple(steps), final, self.runtime.start, self.runtime.stop)
            try:
                await s.client_conn.push(sw.OUT, msg.to_meta(), outs)
            except _GONE:
                log.info("client of session %s is gone; closing it", sid.hex()[:8])
                self.table.close(sid)

    async def _report(self, conn: Connection | None, sid: bytes, step: int, code: ErrorCode, msg: str,
                      blame: PeerID | None) -> None:
        if conn is None or conn.closed:
            return
        err = sw.Err(sid, step, code, msg[:500], self.runtime.start, self.runtime.stop, blame)
        try:
            await conn.push(sw.ERR, err.to_meta(), [])
        except _GONE:
            pass

    async def on_relayed_error(self, conn: Connection, meta: Meta, tensors: list[TensorBlob]) -> None:
        """The next worker rejected a step we pushed: tell our session's client, blaming it."""
        try:
            err = sw.Err.from_meta_untrusted(meta)
            s = self.table.get(err.sid)
        except (SessionError, BadRequest):
            return
        if s.next_addr is None or s.next_addr.peer != conn.peer:
            return  # only the session's own next hop may report against it
        await self._report(s.client_conn, err.sid, err.step, err.code,
                           f"next worker {conn.peer.short()} rejected the step: {err.msg}", blame=conn.peer)


def _best_effort_ids(meta: Meta) -> tuple[bytes, int]:
    """The session id and step of a (maybe malformed) step push, for its error report."""
    sid, step = meta.get("sid"), meta.get("step")
    if not isinstance(sid, bytes) or len(sid) > sw.MAX_SID_BYTES:
        sid = b""
    if not isinstance(step, int) or isinstance(step, bool) or not -1 <= step <= sw.MAX_STEP:
        step = -1
    return sid, step
