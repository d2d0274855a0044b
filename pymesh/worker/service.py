"""A worker's RPC service: inference sessions (the ``pm.*`` calls) on top of its data path.

The data path (pushed steps, the span computed, outputs pushed on) is
:class:`pymesh.worker.datapath.DataPath`, this class's base. Every message is a typed
object of :mod:`pymesh.proto.session_wire`.

A session belongs to the peer that opened it (its client): only that peer may change,
close, flush, replay, link-check or read the counters of it; worker-wide counters are
public. The next hop of a session must be another worker whose verified record for this
model serves the blocks right after ours; it is dialled at the address that record
announces (``resolve_next``), never at an address only the request named, and a failure to
reach it says so without saying why (a refused port and a silent one read the same).
With ``allow_peers`` the worker serves only listed clients and pushes only to listed workers.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Awaitable, Callable

import trio

from pymesh import PROTOCOL_VERSION
from pymesh.errors import PymeshError
from pymesh.net.clock import Clock, TrioClock
from pymesh.net.rpc import CallContext, Connection, Meta, RemoteError, RpcNode
from pymesh.proto import session_wire as sw
from pymesh.proto.frames import TensorBlob
from pymesh.proto.identity import PeerID
from pymesh.proto.session_wire import BadRequest, ErrorCode
from pymesh.proto.vocab import WorkerState
from pymesh.settings import WorkerSettings
from pymesh.worker.datapath import HOP_ERRORS, DataPath, Dial
from pymesh.proto.receipts import Signer
from pymesh.worker.directory import NextAddr, NextHopResolver, PeerFilter
from pymesh.worker.faults import Corruptor
from pymesh.worker.receipts import digest_of
from pymesh.worker.runtime import Runtime
from pymesh.worker.sessions import Session, SessionError, SessionTable

log = logging.getLogger(__name__)

Reply = tuple[Meta, list[TensorBlob]]
Call = Callable[[CallContext, Meta, list[TensorBlob]], Awaitable[Reply]]

__all__ = ["WorkerService", "Dial"]

#: what a link check can run into: the hop errors, or an answer that is an error or malformed
_LINK_ERRORS = (*HOP_ERRORS, RemoteError, BadRequest)


class WorkerService(DataPath):
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
        allow_peers: PeerFilter | None = None,
        signer: Signer | None = None,
        corruptor: Corruptor | None = None,
    ) -> None:
        super().__init__(runtime, table, peer=peer, dial=dial, hidden_size=hidden_size,
                         settings=settings or WorkerSettings(), clock=clock or TrioClock(), allow_peers=allow_peers,
                         model_id=model_id, signer=signer, corruptor=corruptor)
        if signer is not None and signer.peer_id != peer:
            raise ValueError("the receipt signer must be this worker's own identity")
        self._resolve_next = resolve_next
        self.state = WorkerState.JOINING

    # -- wiring ----------------------------------------------------------------------------
    def register(self, node: RpcNode) -> None:
        node.register(sw.INFO, self._wrap(self.info))
        node.register(sw.OPEN, self._wrap(self.open))
        node.register(sw.SET_NEXT, self._wrap(self.set_next))
        node.register(sw.CLOSE, self._wrap(self.close))
        node.register(sw.FORWARD, self._wrap(self.forward))
        node.register(sw.STATS, self._wrap(self.stats))
        node.register(sw.FLUSH, self._wrap(self.flush))
        node.register(sw.LINK, self._wrap(self.check_link))
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
        self.use_runtime(runtime)
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
        self._check_client(ctx.peer)
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
        self._check_prev(req.prev)
        if req.receipts and self.signer is None:
            raise SessionError(ErrorCode.REFUSED, "this worker cannot sign receipts (it has no signing identity); "
                                                  "use another worker or open without receipts")
        now = self.clock.monotonic()
        old = self.table.sessions.get(req.sid)
        unstepped_since: float | None = None
        if old is not None and req.reset and old.client == ctx.peer:
            unstepped_since = None if old.stepped else old.opened
            self.table.close(req.sid)  # a fresh session under a reused id (the client re-routed back here)
        existing = self.table.sessions.get(req.sid)
        route = (existing.next_hop, existing.next_addr, existing.prev) if existing is not None else None
        s = self.table.open(req.sid, ctx.peer, req.max_tokens, req.batch, req.next_hop, now,
                            host=_host(ctx.connection))
        if unstepped_since is not None:
            s.opened = unstepped_since  # resetting a reservation that never got a step does not renew it
        s.client_conn = ctx.connection
        s.copy_every = req.copies
        s.prev = req.prev
        try:
            if existing is None:
                s.cache = await rt.run(lambda: rt.new_cache(req.max_tokens, req.batch))
            s.next_addr = await self._connect_next(req.next_hop)
        except BaseException:
            if route is None:
                self.table.close(req.sid)  # a session that cannot reach its next hop reserves nothing
            else:
                s.next_hop, s.next_addr, s.prev = route  # a failed re-open leaves the session's route as it was
            raise
        s.receipts = req.receipts
        log.info("session %s opened (%d tokens x %d) -> %s", req.sid.hex()[:8], req.max_tokens, req.batch,
                 s.next_addr.describe() if s.next_addr else "client")
        return sw.OpenReply(rt.start, rt.stop, self.table.free_tokens).to_meta(), []

    def _check_client(self, peer: PeerID) -> None:
        if not self.allowed(peer):
            raise SessionError(ErrorCode.NOT_LISTED, f"this worker serves only the peers on its allowlist "
                                                     f"(--allow-peers), and {peer} is not on it")

    def _check_prev(self, prev: PeerID | None) -> None:
        if prev == self.peer:
            raise BadRequest("prev names this worker itself; it must be the previous hop of the route")
        if prev is not None and not self.allowed(prev):
            raise SessionError(ErrorCode.REFUSED, f"previous hop {prev.short()} is not on this worker's allowlist")

    async def _connect_next(self, hop: sw.NextHop | None) -> NextAddr | None:
        """Resolve ``hop`` to its verified record's address and dial it (``None``: last hop)."""
        if hop is None:
            return None
        if hop.peer == self.peer:
            raise BadRequest("the next hop cannot be this worker itself (that is a forwarding loop)")
        if hop.start != self.runtime.stop:
            raise BadRequest(f"the next hop must serve the blocks after this worker's (from {self.runtime.stop}), "
                             f"not {hop.start}-{hop.stop - 1}")
        if not self.allowed(hop.peer):
            raise RemoteError(ErrorCode.NEXT_UNKNOWN,
                              f"peer {hop.peer} is not on this worker's allowlist; it pushes only to listed workers")
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
        except HOP_ERRORS as exc:
            log.info("cannot reach next worker %s: %s", addr.describe(), exc)
            # Not why: whether a port refused or stayed silent is none of the requester's business.
            raise RemoteError(ErrorCode.NEXT_UNREACHABLE,
                              f"cannot reach the next worker {hop.peer.short()} at the address its record "
                              "announces (a link failure); try another route") from None
        return addr

    async def set_next(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> Reply:
        req = sw.SetNext.from_meta_untrusted(meta)
        s = self._own_session(ctx, req.sid)
        self._check_prev(req.prev)
        addr = await self._connect_next(req.next_hop)
        s.next_hop, s.next_addr, s.prev = req.next_hop, addr, req.prev
        return sw.Empty().to_meta(), []

    async def check_link(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> Reply:
        """Is this hop's link to the session's next hop alive? (a short pm.info over it)"""
        s = self._own_session(ctx, sw.CheckLink.from_meta_untrusted(meta).sid)
        addr = s.next_addr
        if addr is None:
            return sw.CheckLinkReply(True, "last hop: results go straight to the client").to_meta(), []
        timeout = min(self.settings.next_hop_timeout, 3.0)
        try:
            with trio.fail_after(timeout):
                conn = await self._dial(addr.transport, addr.host, addr.port, addr.peer)
                reply, _ = await conn.call(sw.INFO, sw.Info().to_meta(), timeout=timeout)
            info = sw.InfoReply.from_meta_untrusted(reply)
        except _LINK_ERRORS as exc:
            log.info("link check of session %s: next worker %s: %s", s.sid.hex()[:8], addr.describe(), exc)
            return sw.CheckLinkReply(False, f"next worker {addr.peer.short()} did not answer over this "
                                            "worker's link").to_meta(), []
        if info.peer != addr.peer or info.stop <= self.runtime.stop or info.start != self.runtime.stop:
            return sw.CheckLinkReply(False, f"next worker {addr.peer.short()} answered but no longer serves "
                                            f"blocks from {self.runtime.stop}").to_meta(), []
        return sw.CheckLinkReply(True, f"next worker {addr.peer.short()} answered").to_meta(), []

    async def close(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> Reply:
        sid = sw.Close.from_meta_untrusted(meta).sid
        s = self.table.sessions.get(sid)
        closed = s is not None and s.client == ctx.peer and self.table.close(sid)
        return sw.CloseReply(bool(closed), self.table.free_tokens).to_meta(), []

    async def stats(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> Reply:
        """Worker-wide counters for anyone; one session's only for its client."""
        req = sw.Stats.from_meta_untrusted(meta)
        s = self.table.sessions.get(req.sid) if req.sid is not None else None
        if s is not None and s.client != ctx.peer:
            s = None
        c, t = self.counters, self.table
        return sw.StatsReply(
            from_client=c["from_client"], from_peer=c["from_peer"], steps=c["steps"], replayed=c["replayed"],
            errors=c["errors"], compute_us=c["compute_us"], sessions=len(t.sessions), free=t.free_tokens,
            total=t.budget_tokens, expired=t.expired, refused=t.refused, start=self.runtime.start,
            stop=self.runtime.stop,
            session=None if s is None else sw.SessionCounters(s.from_client, s.from_peer, s.next_step, s.replayed),
            forwards=c["forwards"],
        ).to_meta(), []

    async def flush(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> Reply:
        """Hand over the recovery copies not yet pushed to the client (it is recovering)."""
        s = self._own_session(ctx, sw.Flush.from_meta_untrusted(meta).sid)
        steps = sorted(s.pending)
        outs = [s.pending.pop(k) for k in steps]
        return sw.FlushReply(tuple(steps), self.runtime.start, self.runtime.stop).to_meta(), outs

    async def forward(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> Reply:
        """Replay one step of a session (rebuilds the cache); the output goes back, not on, with
        a receipt for it (``prev`` empty) when the session was opened with receipts."""
        req = sw.Forward.from_meta_untrusted(meta)
        s = self._own_session(ctx, req.sid)
        out = await self.compute(s, req, tensors)
        s.replayed += 1
        self.counters["replayed"] += 1
        lie = self._decide_lie(s, pushes=False)
        if lie == "noise":
            out = self._noisy(out)
        rc = None
        if s.receipts:
            rc = self._sign(s, req, int(tensors[0].shape[1]), await digest_of(tensors[0]), await digest_of(out), b"",
                            lie=lie)
        return sw.ForwardReply(rc).to_meta(), [out]

    def _own_session(self, ctx: CallContext, sid: bytes) -> Session:
        s = self.table.get(sid)
        if s.client != ctx.peer:
            raise SessionError(ErrorCode.BAD_REQUEST, "only the client that opened a session may change it")
        s.last_used = self.clock.monotonic()
        return s

def _host(conn: Connection) -> str | None:
    """Whose address quota the peer's sessions count against: its IPv4 address, or the /64
    network of its IPv6 address (one host commonly has a whole /64); None when the transport
    knows no address (an in-memory stream)."""
    host = conn.remote_host
    if host is None or ":" not in host:
        return host
    return str(ipaddress.IPv6Network((host, 64), strict=False))
