"""A worker's data path: pushed steps in, the span computed, the output pushed on.

One step of a session arrives as a ``pm.step`` push (from the client at the first hop,
from the previous worker after that). The worker checks who sent it (only the session's
bound previous hop, or its client when it has none), the step order and the queues, runs
its span in the compute thread, pushes the output straight to the next worker of the
session's route, then pushes a copy to the client (``pm.out``): the last hop's copy is
the result, the others are what the client keeps to replay a span after a fault.
Failures go back as ``pm.err`` pushes naming the peer to blame; a step that cannot be
delivered to the next worker is reported to the client at once as a link failure
(``next_unreachable``, ``link=True``), never dropped silently. A push only hands bytes to
the transport, so when the connection it went over ends within ``LINK_WATCH`` seconds (a
TCP reset, a QUIC stateless reset: the next worker's process is gone), the steps pushed in
that window are reported as link failures too; a client that already has such a step's
result ignores the report.

Sessions opened with receipts (``rcpt``): a step pushed by the previous worker must carry
its signed receipt for that exact tensor (:mod:`pymesh.worker.receipts`), or it is refused
uncomputed (``bad_receipt`` blaming the pusher); this hop signs its own receipt (input and
output digests, ``prev`` = the received receipt's digest), pushes it on with the output and
sends the client a ``pm.out`` every step carrying it and the received one (``steps`` empty
when no recovery copy is due). A test-fault ``Corruptor`` (:mod:`pymesh.worker.faults`)
lies here, after computing and before hashing.

Everything a peer can make this worker hold is bounded: steps in flight per sender and
per node (``MAX_INFLIGHT_PER_PEER``, ``MAX_INFLIGHT``), future steps waiting for their
predecessor per session (``MAX_WAITING``, each holding its one tensor), and retries of a
step (``sessions.MAX_RETRIES``), so no route, even a loop, computes without end.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable, Protocol

import trio

from pymesh.errors import ConnectionClosed, IdentityError, PeerUnavailable, PymeshError
from pymesh.net.clock import Clock
from pymesh.net.rpc import Connection, Meta
from pymesh.proto import session_wire as sw
from pymesh.proto.frames import TensorBlob
from pymesh.proto.identity import PeerID
from pymesh.proto.session_wire import BadRequest, ErrorCode
from pymesh.proto.vocab import Transport
from pymesh.settings import WorkerSettings
from pymesh.proto.receipts import SignedReceipt, Signer
from pymesh.worker.directory import PeerFilter
from pymesh.worker.faults import Corruptor
from pymesh.worker.receipts import (BadReceipt, StepClaim, check_received, compute_dtype, device_kind, digest_of,
                                    sign_step)
from pymesh.worker.runtime import Runtime
from pymesh.worker.sessions import Session, SessionError, SessionTable, advance, check_step

log = logging.getLogger(__name__)

#: future steps of one session that may wait for their predecessor at once
MAX_WAITING = 4
#: step pushes being processed at once, per sending peer and for the whole node
MAX_INFLIGHT_PER_PEER = 64         # a previous worker carries the steps of all its sessions
MAX_INFLIGHT = 512

#: seconds after a push during which the connection's end means the step may be lost
LINK_WATCH = 5.0

#: errors of dialling or pushing to the next hop: it is unreachable (or not who its record says)
HOP_ERRORS = (PeerUnavailable, ConnectionClosed, IdentityError, trio.TooSlowError, OSError)
#: a push back to the client failed: it went away, or this node already closed its connection
GONE = (PeerUnavailable, ConnectionClosed)


#: upper bounds of the forward-rows histogram (Prometheus ``le``); the last bucket is +Inf
FORWARD_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Buckets:
    """A histogram as plain counts (the worker does not import prometheus-client; the
    metrics collector turns it into one): ``counts[i]`` observations <= ``bounds[i]``
    and above the previous bound, ``counts[-1]`` those above every bound."""

    def __init__(self, bounds: tuple[int, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0

    def observe(self, value: int) -> None:
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs, ending with ("+Inf", all)."""
        out, run = [], 0
        for b, n in zip([*map(str, self.bounds), "+Inf"], self.counts):
            run += n
            out.append((b, run))
        return out


class Dial(Protocol):
    async def __call__(self, transport: Transport, host: str, port: int, peer: PeerID) -> Connection:
        """An authenticated connection to ``peer`` (pinned key) at ``host:port``."""
        ...


class DataPath:
    """Step processing of :class:`pymesh.worker.service.WorkerService` (its base class)."""

    def __init__(self, runtime: Runtime, table: SessionTable, *, peer: PeerID, dial: Dial,
                 hidden_size: int | None, settings: WorkerSettings, clock: Clock,
                 allow_peers: PeerFilter | None, model_id: str = "", signer: Signer | None = None,
                 corruptor: Corruptor | None = None) -> None:
        self.settings = settings
        self.use_runtime(runtime)
        self.model_id = model_id
        self.signer = signer          # signs receipts (the worker's Identity); None: no receipts
        self.corruptor = corruptor    # test faults only (PYMESH_TEST_FAULTS + PYMESH_TEST_CORRUPT)
        self.table = table
        self.peer = peer
        self._dial = dial
        self.hidden_size = hidden_size
        self.clock = clock
        self.allow_peers = allow_peers
        self.counters = {"from_client": 0, "from_peer": 0, "steps": 0, "replayed": 0, "errors": 0,
                         "compute_us": 0, "forwards": 0, "rejected": 0, "receipts_signed": 0, "bad_receipts": 0,
                         "corrupted": 0}
        #: rows (batch x positions) of each forward computed, bucketed for /metrics: decode
        #: steps are 1 row per sequence, prefill chunks many
        self.forward_rows = Buckets(FORWARD_ROW_BUCKETS)
        self._nursery: trio.Nursery | None = None
        self._progress: dict[bytes, trio.Event] = {}
        self._inflight: Counter[PeerID] = Counter()
        self._pushed: dict[Connection, dict[bytes, tuple[int, float]]] = {}   # conn -> sid -> (step, when)

    def use_runtime(self, runtime: Runtime) -> None:
        """Compute with ``runtime``, its batching set as the worker's settings say."""
        self.runtime = runtime
        runtime.batcher.configure(enabled=self.settings.batching, max_tokens=self.settings.batch_tokens)

    def allowed(self, peer: PeerID) -> bool:
        return self.allow_peers is None or self.allow_peers.allows(peer)

    async def compute(self, s: Session, req: sw.StepRef, tensors: list[TensorBlob],
                      during: "Callable[[], object] | None" = None) -> TensorBlob:
        from pymesh.model.blobs import blob_to_tensor, tensor_to_blob

        sw.check_tensor_count(tensors, 1, "a step")
        seq = sw.check_hidden_shape(tuple(tensors[0].shape), self.hidden_size, s.max_tokens, s.batch)
        if check_step(s, req.step, req.pos, seq) == "future":
            await self._wait_for_predecessor(s, req, seq)
        x = blob_to_tensor(tensors[0])
        rt = self.runtime
        s.busy = True
        t0 = time.perf_counter()
        try:
            y = await rt.batcher.step(x, s.cache, req.pos, observe=self._observe_forward, during=during)
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

    def _observe_forward(self, rows: int) -> None:
        """A forward pass of ``rows`` rows ran (several sessions' steps when batched)."""
        self.counters["forwards"] += 1
        self.forward_rows.observe(rows)

    async def _wait_for_predecessor(self, s: Session, req: sw.StepRef, seq: int) -> None:
        """Hold a step that arrived early (with its one tensor) until the ones before it are done."""
        if req.step in s.waiting:
            raise SessionError(ErrorCode.BAD_REQUEST, f"step {req.step} is already waiting for step {s.next_step}")
        if len(s.waiting) >= MAX_WAITING or req.step >= s.next_step + MAX_WAITING + 1:
            raise SessionError(ErrorCode.BAD_REQUEST,
                               f"step {req.step} is too far ahead: the session is at step {s.next_step} and "
                               f"at most {MAX_WAITING} later steps may wait; send steps in order")
        s.waiting.add(req.step)
        try:
            with trio.move_on_after(self.settings.step_wait):
                while check_step(s, req.step, req.pos, seq) == "future":
                    await self._progress.setdefault(s.sid, trio.Event()).wait()
        finally:
            s.waiting.discard(req.step)
        if check_step(s, req.step, req.pos, seq) == "future":
            raise SessionError(ErrorCode.BAD_REQUEST, f"step {req.step} arrived but step {s.next_step} never did")

    async def on_step(self, conn: Connection, meta: Meta, tensors: list[TensorBlob]) -> None:
        if self._nursery is None:
            return
        sender = conn.peer
        if self._inflight[sender] >= MAX_INFLIGHT_PER_PEER or sum(self._inflight.values()) >= MAX_INFLIGHT:
            sid, step = best_effort_ids(meta)
            self.counters["rejected"] += 1
            await self.report(conn, sid, step, ErrorCode.BUSY,
                              "too many steps in flight from you on this worker; wait for the results", None)
            return
        self._inflight[sender] += 1
        self._nursery.start_soon(self._process_step, conn, meta, tensors)

    async def _process_step(self, conn: Connection, meta: Meta, tensors: list[TensorBlob]) -> None:
        try:
            await self._process_step_inner(conn, meta, tensors)
        finally:
            self._inflight[conn.peer] -= 1
            if self._inflight[conn.peer] <= 0:
                del self._inflight[conn.peer]

    def _accept_sender(self, conn: Connection, meta: Meta) -> Session:
        """The session a step is for, if ``conn``'s peer may push its steps (raises otherwise:
        the caller answers the sender only, so a stranger cannot make the client ban anyone)."""
        if not self.allowed(conn.peer):
            raise BadRequest("this worker accepts steps only from the peers on its allowlist")
        req = sw.Step.from_meta_untrusted(meta)
        s = self.table.get(req.sid)
        if conn.peer != s.sender:
            raise BadRequest("this session accepts steps only from its bound previous hop "
                             "(or its client at the first hop); reopen or relink it naming you as prev")
        s.last_used = self.clock.monotonic()
        return s

    async def _process_step_inner(self, conn: Connection, meta: Meta, tensors: list[TensorBlob]) -> None:
        sid, step = best_effort_ids(meta)
        try:
            s = self._accept_sender(conn, meta)
        except PymeshError as exc:
            self.counters["rejected"] += 1
            code = exc.code if isinstance(exc, SessionError) else ErrorCode.BAD_REQUEST
            log.info("step %d of session %s from %s refused: %s", step, sid.hex()[:8], conn.peer.short(), exc)
            await self.report(conn, sid, step, code, str(exc), blame=None)
            return
        try:
            req = sw.Step.from_meta_untrusted(meta)
            received: SignedReceipt | None = None
            inp_digest = b""
            check = None
            if s.receipts:
                sw.check_tensor_count(tensors, 1, "a step")
                inp_digest = await digest_of(tensors[0])
                if s.prev is not None:  # pushed by the previous worker: its receipt must match

                    def check() -> None:  # verified while the step computes (batcher)
                        nonlocal received
                        received = self._check_receipt(conn, s, req, tensors[0], inp_digest)
            if conn.peer == s.client:
                s.from_client += 1
                self.counters["from_client"] += 1
            else:
                s.from_peer += 1
                self.counters["from_peer"] += 1
            out = await self.compute(s, req, tensors, during=check)
        except BadReceipt as exc:
            self.counters["bad_receipts"] += 1
            log.warning("step %d of session %s from %s refused: %s", step, sid.hex()[:8], conn.peer.short(), exc)
            await self.report(s.client_conn, sid, step, ErrorCode.BAD_RECEIPT, str(exc), blame=conn.peer)
            return
        except PymeshError as exc:  # SessionError, BadRequest and the rest
            code = exc.code if isinstance(exc, SessionError) else ErrorCode.BAD_REQUEST
            self.counters["errors"] += 1
            log.warning("step %d of session %s failed: %s", step, sid.hex()[:8], exc)
            await self.report(s.client_conn or conn, sid, step, code, str(exc), blame=None)
            return
        lie = self._decide_lie(s, pushes=s.next_addr is not None)
        to_next = to_client = self._noisy(out) if lie == "noise" else out
        if lie == "equivocate":
            to_next = self._noisy(out)
        rc_next = rc_client = None
        if s.receipts:
            prev = received.digest if received is not None else b""
            seq = int(tensors[0].shape[1])
            rc_client = self._sign(s, req, seq, inp_digest, await digest_of(to_client), prev, lie=lie)
            rc_next = rc_client if to_next is to_client else \
                self._sign(s, req, seq, inp_digest, await digest_of(to_next), prev, lie=lie)
        if s.next_addr is not None and not await self._push_on(s, req, to_next, rc_next):
            return
        await self._copy_to_client(s, step, to_client, rc=rc_client,
                                   prc=received.wire if received is not None else None)

    def _check_receipt(self, conn: Connection, s: Session, req: sw.Step, blob: TensorBlob,
                       digest: bytes) -> SignedReceipt:
        """The previous worker's receipt for this pushed step, ``blob`` (its ``digest``) in
        hand (raises BadReceipt, BadRequest)."""
        seq = sw.check_hidden_shape(tuple(blob.shape), self.hidden_size, s.max_tokens, s.batch)
        return check_received(req.rc, pusher=conn.peer, claim=self._claim(s, req, seq), digest=digest)

    def _claim(self, s: Session, req: sw.StepRef, seq: int) -> StepClaim:
        rt = self.runtime
        return StepClaim(self.model_id, s.sid, req.step, req.pos, seq, rt.start, rt.stop,
                         compute_dtype(rt.dtype_name), device_kind(rt.device))

    def _sign(self, s: Session, req: sw.StepRef, seq: int, inp: bytes, out: bytes, prev: bytes, *,
              lie: str | None) -> bytes:
        """This hop's signed receipt (wire bytes) for ``req``: digests ``inp`` in, ``out`` sent."""
        assert self.signer is not None, "sessions with receipts are opened only on a worker with a signer"
        if lie == "receipt" and self.corruptor is not None:
            out = self.corruptor.wrong_digest(out)
        signed = sign_step(self.signer, self._claim(s, req, seq), inp=inp, out=out, prev=prev)
        self.counters["receipts_signed"] += 1
        return signed.wire

    def _noisy(self, out: TensorBlob) -> TensorBlob:
        assert self.corruptor is not None
        return self.corruptor.noisy(out)

    def _decide_lie(self, s: Session, *, pushes: bool) -> str | None:
        """The test-fault corruptor's choice for this step (None: honest); ``pushes``: the
        output also goes to a next hop (else equivocating is lying with noise)."""
        lie = self.corruptor.decide() if self.corruptor is not None else None
        if lie == "equivocate" and not pushes:
            lie = "noise"
        if lie is not None:
            self.counters["corrupted"] += 1
        return lie

    async def _push_on(self, s: Session, req: sw.Step, out: TensorBlob, rc: bytes | None = None) -> bool:
        """Push the output to the next worker; a failure is reported to the client at once."""
        addr = s.next_addr
        assert addr is not None
        if not self.allowed(addr.peer):
            await self.report(s.client_conn, s.sid, req.step, ErrorCode.NEXT_UNKNOWN,
                              f"next worker {addr.peer.short()} is not on this worker's allowlist", blame=addr.peer)
            return False
        try:
            with trio.fail_after(self.settings.next_hop_timeout):
                nconn = await self._dial(addr.transport, addr.host, addr.port, addr.peer)
                await nconn.push(sw.STEP, sw.Step(req.sid, req.step, req.pos, rc).to_meta(), [out])
                self._watch(nconn, s.sid, req.step)
        except HOP_ERRORS as exc:
            log.warning("cannot push step %d to next worker %s: %s", req.step, addr.describe(), exc)
            await self.report(s.client_conn, s.sid, req.step, ErrorCode.NEXT_UNREACHABLE,
                              f"the link to next worker {addr.peer.short()} failed; check the link or relink "
                              "the session", blame=addr.peer, link=True)
            return False
        return True

    def _watch(self, conn: Connection, sid: bytes, step: int) -> None:
        recent = self._pushed.get(conn)
        if recent is None:
            recent = self._pushed[conn] = {}
            if self._nursery is not None:
                self._nursery.start_soon(self._watch_link, conn)
        recent[sid] = (step, self.clock.monotonic())

    async def _watch_link(self, conn: Connection) -> None:
        """Report the steps pushed over ``conn`` shortly before it ended (they may be lost)."""
        try:
            while not conn.closed:
                await trio.sleep(0.25)
                now = self.clock.monotonic()
                recent = self._pushed.get(conn, {})
                for sid in [k for k, (_, t) in recent.items() if now - t > LINK_WATCH]:
                    del recent[sid]
            now = self.clock.monotonic()
            for sid, (step, t) in list(self._pushed.get(conn, {}).items()):
                s = self.table.sessions.get(sid)
                if s is None or now - t > LINK_WATCH or conn.closed_locally:
                    continue
                log.warning("link to %s ended %.1f s after step %d of session %s was pushed; reporting it",
                            conn.peer.short(), now - t, step, sid.hex()[:8])
                await self.report(s.client_conn, sid, step, ErrorCode.NEXT_UNREACHABLE,
                                  f"the link to next worker {conn.peer.short()} ended right after step {step} "
                                  "was pushed; it may be lost: check the link or relink the session",
                                  blame=conn.peer, link=True)
        finally:
            self._pushed.pop(conn, None)

    async def _copy_to_client(self, s: Session, step: int, out: TensorBlob, *, rc: bytes | None = None,
                              prc: bytes | None = None) -> None:
        # The result (last hop) goes to the client at once; other hops batch their recovery
        # copies (the client fetches the unsent ones with pm.flush when it needs them). With
        # receipts a pm.out goes every step (its receipts), with the copies that are due.
        final = s.next_addr is None
        if not final:
            s.pending[step] = out
            if len(s.pending) < s.copy_every and rc is None:
                return
        due = final or len(s.pending) >= s.copy_every
        steps = [step] if final else sorted(s.pending) if due else []
        outs = [out] if final else [s.pending.pop(k) for k in steps]
        if s.client_conn is not None:
            msg = sw.Out(s.sid, step, tuple(steps), final, self.runtime.start, self.runtime.stop, rc, prc)
            try:
                await s.client_conn.push(sw.OUT, msg.to_meta(), outs)
            except GONE:
                log.info("client of session %s is gone; closing it", s.sid.hex()[:8])
                self.table.close(s.sid)

    async def report(self, conn: Connection | None, sid: bytes, step: int, code: ErrorCode, msg: str,
                     blame: PeerID | None, *, link: bool = False) -> None:
        if conn is None or conn.closed:
            return
        err = sw.Err(sid, step, code, msg[:500], self.runtime.start, self.runtime.stop, blame, link)
        try:
            await conn.push(sw.ERR, err.to_meta(), [])
        except GONE:
            pass

    async def on_relayed_error(self, conn: Connection, meta: Meta, tensors: list[TensorBlob]) -> None:
        """The next worker rejected a step we pushed: tell our session's client, blaming it
        (the sender: it cannot blame anyone else through us)."""
        try:
            err = sw.Err.from_meta_untrusted(meta)
            s = self.table.get(err.sid)
        except (SessionError, BadRequest):
            return
        if s.next_addr is None or s.next_addr.peer != conn.peer:
            return  # only the session's own next hop may report against it
        await self.report(s.client_conn, err.sid, err.step, err.code,
                          f"next worker {conn.peer.short()} rejected the step: {err.msg}", blame=conn.peer)


def best_effort_ids(meta: Meta) -> tuple[bytes, int]:
    """The session id and step of a (maybe malformed) step push, for its error report."""
    sid, step = meta.get("sid"), meta.get("step")
    if not isinstance(sid, bytes) or len(sid) > sw.MAX_SID_BYTES:
        sid = b""
    if not isinstance(step, int) or isinstance(step, bool) or not -1 <= step <= sw.MAX_STEP:
        step = -1
    return sid, step
