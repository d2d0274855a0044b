"""A worker's RPC service: inference sessions and the worker-to-worker data path.

One step of a session arrives as a ``pm.step`` push (from the client at the first hop,
from the previous worker after that). The worker checks the step order, runs its span
in the compute thread, pushes the output straight to the next worker of the session's
route, then pushes a copy to the client (``pm.out``): the last hop's copy is the
result, the others are what the client keeps to replay a span after a fault.
Failures go back as ``pm.err`` pushes naming the peer to blame.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import trio

from pymesh import PROTOCOL_VERSION
from pymesh.errors import PeerUnavailable, PymeshError
from pymesh.net.rpc import CallContext, Connection, Meta, RemoteError, RpcNode
from pymesh.proto.frames import TensorBlob
from pymesh.worker import wire
from pymesh.worker.runtime import Runtime
from pymesh.worker.sessions import Session, SessionError, SessionTable, advance, check_step

log = logging.getLogger(__name__)

#: how long a step that arrived early waits for the previous one (seconds)
STEP_WAIT = float(os.environ.get("PYMESH_STEP_WAIT", "10"))
#: how long dialing / pushing to the next hop may take (seconds)
NEXT_HOP_TIMEOUT = float(os.environ.get("PYMESH_NEXT_HOP_TIMEOUT", "5"))


class WorkerService:
    def __init__(
        self,
        runtime: Runtime,
        table: SessionTable,
        *,
        model_id: str,
        peer_text: str,
        dial: Callable[[str, str, int, Any], Any],
        hidden_size: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.table = table
        self.model_id = model_id
        self.peer_text = peer_text
        self._dial = dial            # async (transport, host, port, peer_id) -> Connection
        self.hidden_size = hidden_size
        self.clock = clock
        self.state = "joining"
        self.counters = {"from_client": 0, "from_peer": 0, "steps": 0, "replayed": 0, "errors": 0,
                         "compute_us": 0}
        self._nursery: trio.Nursery | None = None
        self._progress: dict[bytes, trio.Event] = {}

    # -- wiring ----------------------------------------------------------------------------
    def register(self, node: RpcNode) -> None:
        node.register(wire.INFO, self._wrap(self.info))
        node.register(wire.OPEN, self._wrap(self.open))
        node.register(wire.SET_NEXT, self._wrap(self.set_next))
        node.register(wire.CLOSE, self._wrap(self.close))
        node.register(wire.FORWARD, self._wrap(self.forward))
        node.register(wire.STATS, self._wrap(self.stats))
        node.register(wire.FLUSH, self._wrap(self.flush))
        node.on_push(wire.STEP, self.on_step)
        node.on_push(wire.ERR, self.on_relayed_error)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Owns the tasks that process pushed steps and expires idle sessions."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(min(1.0, max(self.table.idle_timeout / 4, 0.05)))
                for sid in self.table.expire(self.clock()):
                    log.info("session %s expired after %.0f s idle; cache freed", sid.hex()[:8],
                             self.table.idle_timeout)

    def swap_runtime(self, runtime: Runtime) -> int:
        """Serve another span (placement moved us); open sessions are dropped."""
        self.runtime = runtime
        return self.table.clear()

    @staticmethod
    def _wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        async def handler(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> Any:
            try:
                return await fn(ctx, meta, tensors)
            except SessionError as exc:
                raise RemoteError(exc.code, exc.message) from None
            except wire.BadRequest as exc:
                raise RemoteError("bad_request", str(exc)) from None
            except PymeshError as exc:
                if isinstance(exc, RemoteError):
                    raise
                raise RemoteError("bad_request", f"{type(exc).__name__}: {exc}") from None

        return handler

    # -- calls -----------------------------------------------------------------------------
    async def info(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        return {
            "peer": self.peer_text, "model": self.model_id, "start": self.runtime.start,
            "stop": self.runtime.stop, "version": PROTOCOL_VERSION, "state": self.state,
            "free": self.table.free_tokens, "total": self.table.budget_tokens,
            "sessions": len(self.table.sessions),
        }, []

    async def open(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        if self.state == "offline":
            raise SessionError("refused", "this worker is shutting down; use another one")
        model = wire.get_str(meta, "model", 200, default=self.model_id)
        if model != self.model_id:
            raise SessionError("bad_request", f"this worker serves {self.model_id}, not {model}")
        start = wire.get_int(meta, "start", 0, 1 << 20, default=self.runtime.start)
        stop = wire.get_int(meta, "stop", 1, 1 << 20, default=self.runtime.stop)
        if (start, stop) != (self.runtime.start, self.runtime.stop):
            raise SessionError(
                "refused",
                f"this worker serves blocks {self.runtime.start}-{self.runtime.stop - 1}, not "
                f"{start}-{stop - 1} (it moved); look up the swarm again",
            )
        sid = wire.get_bytes(meta, "sid")
        max_tokens = wire.get_int(meta, "max_tokens", 1, wire.MAX_SESSION_TOKENS)
        batch = wire.get_int(meta, "batch", 1, wire.MAX_BATCH, default=1)
        next_hop = wire.decode_next(meta)
        old = self.table.sessions.get(sid)
        if old is not None and wire.get_int(meta, "reset", 0, 1, default=0) and old.client == ctx.peer:
            self.table.close(sid)  # a fresh session under a reused id (the client re-routed back here)
        existed = sid in self.table.sessions
        s = self.table.open(sid, ctx.peer, max_tokens, batch, next_hop, self.clock())
        s.client_conn = ctx.connection
        s.copy_every = wire.get_int(meta, "copies", 1, wire.MAX_COPY_EVERY, default=1)
        if not existed:
            try:
                s.cache = await self.runtime.run(lambda: self.runtime.new_cache(max_tokens, batch))
            except BaseException:
                self.table.close(sid)
                raise
        if next_hop is not None:
            try:
                await self._connect_next(s)
            except BaseException:
                if not existed:
                    self.table.close(sid)  # a session that cannot reach its next hop reserves nothing
                raise
        log.info("session %s opened (%d tokens x %d) -> %s", sid.hex()[:8], max_tokens, batch,
                 next_hop.peer.short() if next_hop else "client")
        return {"start": self.runtime.start, "stop": self.runtime.stop, "free": self.table.free_tokens}, []

    async def _connect_next(self, s: Session) -> Connection:
        hop = s.next_hop
        assert hop is not None
        try:
            with trio.fail_after(NEXT_HOP_TIMEOUT):
                return await self._dial(hop.transport, hop.host, hop.port, hop.peer)
        except (PeerUnavailable, trio.TooSlowError, OSError) as exc:
            raise RemoteError(
                "next_unreachable",
                f"cannot reach the next worker {hop.peer.short()} at {hop.host}:{hop.port} over "
                f"{hop.transport}: {exc}",
            ) from None

    async def set_next(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        s = self._own_session(ctx, meta)
        s.next_hop = wire.decode_next(meta)
        if s.next_hop is not None:
            await self._connect_next(s)
        return {}, []

    async def close(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        sid = wire.get_bytes(meta, "sid")
        s = self.table.sessions.get(sid)
        closed = s is not None and s.client == ctx.peer and self.table.close(sid)
        return {"closed": int(bool(closed)), "free": self.table.free_tokens}, []

    async def stats(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        out: Meta = dict(self.counters)
        out.update(sessions=len(self.table.sessions), free=self.table.free_tokens,
                   total=self.table.budget_tokens, expired=self.table.expired,
                   refused=self.table.refused, start=self.runtime.start, stop=self.runtime.stop)
        if "sid" in meta:
            s = self.table.sessions.get(wire.get_bytes(meta, "sid"))
            if s is not None:
                out.update(s_from_client=s.from_client, s_from_peer=s.from_peer, s_steps=s.next_step,
                           s_replayed=s.replayed)
        return out, []

    async def flush(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        """Hand over the recovery copies not yet pushed to the client (it is recovering)."""
        s = self._own_session(ctx, meta)
        steps = sorted(s.pending)
        outs = [s.pending.pop(k) for k in steps]
        return {"steps": steps, "start": self.runtime.start, "stop": self.runtime.stop}, outs

    async def forward(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        """Replay one step of a session (rebuilds the cache); the output goes back, not on."""
        s = self._own_session(ctx, meta)
        out = await self._compute(s, meta, tensors)
        s.replayed += 1
        self.counters["replayed"] += 1
        return {}, [out]

    def _own_session(self, ctx: CallContext, meta: Meta) -> Session:
        s = self.table.get(wire.get_bytes(meta, "sid"), self.clock())
        if s.client != ctx.peer:
            raise SessionError("bad_request", "only the client that opened a session may change it")
        return s

    # -- the data path ---------------------------------------------------------------------
    async def _compute(self, s: Session, meta: Meta, tensors: list[TensorBlob]) -> TensorBlob:
        from pymesh.model.blobs import blob_to_tensor, tensor_to_blob

        step = wire.get_int(meta, "step", 0, 1 << 30)
        pos = wire.get_int(meta, "pos", 0, wire.MAX_SESSION_TOKENS)
        if len(tensors) != 1:
            raise wire.BadRequest(f"a step carries exactly one tensor, got {len(tensors)}")
        seq = wire.check_hidden_shape(tuple(tensors[0].shape), self.hidden_size, s.max_tokens, s.batch)
        deadline = trio.current_time() + STEP_WAIT
        while check_step(s, step, pos, seq) == "future":
            event = self._progress.setdefault(s.sid, trio.Event())
            with trio.move_on_at(deadline):
                await event.wait()
            if trio.current_time() >= deadline:
                raise SessionError("bad_request", f"step {step} arrived but step {s.next_step} never did")
        x = blob_to_tensor(tensors[0])
        s.busy = True
        t0 = time.perf_counter()
        try:
            y = await self.runtime.run(lambda: self.runtime.forward(x, s.cache, pos))
        finally:
            self.counters["compute_us"] += int((time.perf_counter() - t0) * 1e6)
            s.busy = False
            s.last_used = self.clock()
        advance(s, step, pos, seq)
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
        sid = b""
        step = -1
        s: Session | None = None
        try:
            sid = wire.get_bytes(meta, "sid")
            step = wire.get_int(meta, "step", 0, 1 << 30)
            s = self.table.get(sid, self.clock())
            if conn.peer == s.client:
                s.from_client += 1
                self.counters["from_client"] += 1
            else:
                s.from_peer += 1
                self.counters["from_peer"] += 1
            out = await self._compute(s, meta, tensors)
        except (SessionError, wire.BadRequest, PymeshError) as exc:
            code = exc.code if isinstance(exc, SessionError) else "bad_request"
            self.counters["errors"] += 1
            log.warning("step %d of session %s failed: %s", step, sid.hex()[:8], exc)
            target = s.client_conn if s is not None and s.client_conn is not None else conn
            await self._report(target, sid, step, code, str(exc), blame=None)
            return
        step_meta: Meta = {"sid": sid, "step": step, "pos": meta.get("pos", 0)}
        if s.next_hop is not None:
            hop = s.next_hop
            try:
                with trio.fail_after(NEXT_HOP_TIMEOUT):
                    nconn = await self._dial(hop.transport, hop.host, hop.port, hop.peer)
                    await nconn.push(wire.STEP, step_meta, [out])
            except (PeerUnavailable, trio.TooSlowError, OSError) as exc:
                log.warning("cannot push step %d to next worker %s: %s", step, hop.peer.short(), exc)
                await self._report(s.client_conn, sid, step, "next_unreachable",
                                   f"next worker unreachable: {exc}", blame=hop.peer.key)
                return
        # The result (last hop) goes to the client at once; other hops batch their recovery
        # copies (the client fetches the unsent ones with pm.flush when it needs them).
        final = s.next_hop is None
        if not final:
            s.pending[step] = out
            if len(s.pending) < s.copy_every:
                return
        steps = [step] if final else sorted(s.pending)
        outs = [out] if final else [s.pending.pop(k) for k in steps]
        if s.client_conn is not None:
            try:
                await s.client_conn.push(
                    wire.OUT, {"sid": sid, "step": step, "steps": steps, "final": int(final),
                               "start": self.runtime.start, "stop": self.runtime.stop}, outs)
            except PeerUnavailable:
                log.info("client of session %s is gone; closing it", sid.hex()[:8])
                self.table.close(sid)

    async def _report(self, conn: Connection | None, sid: bytes, step: int, code: str, msg: str,
                      blame: bytes | None) -> None:
        if conn is None or conn.closed:
            return
        meta: Meta = {"sid": sid, "step": step, "code": code, "msg": msg[:500],
                      "start": self.runtime.start, "stop": self.runtime.stop,
                      "blame": blame if blame is not None else b""}
        try:
            await conn.push(wire.ERR, meta, [])
        except PeerUnavailable:
            pass

    async def on_relayed_error(self, conn: Connection, meta: Meta, tensors: list[TensorBlob]) -> None:
        """The next worker rejected a step we pushed: tell our session's client, blaming it."""
        try:
            sid = wire.get_bytes(meta, "sid")
            s = self.table.get(sid)
            msg = wire.get_str(meta, "msg", 600, default="")
            code = wire.get_str(meta, "code", 32, default="internal")
        except (SessionError, wire.BadRequest):
            return
        step = meta.get("step", -1)
        await self._report(s.client_conn, sid, step if isinstance(step, int) else -1, code,
                           f"next worker {conn.peer.short()} rejected the step: {msg}", blame=conn.peer.key)
