"""An inference session along a route of workers, with recovery from dead or stalled ones.

The client pushes a step's hidden states to the first worker only; each worker pushes
its output to the next one and a copy back here. The session keeps, per span boundary,
the input of every step (``history``): when a worker fails, the client bans it, picks a
new route for the blocks (keeping the healthy hops and their caches), replays the
stored inputs through the new workers with the original step shapes, and retries.

Not every failure bans (:mod:`pymesh.client.blame`): a hop whose push to its successor
failed reports a *link* failure, and the client relinks it (it re-dials) and keeps the
successor if its session survived; a hop that does not know its successor (``next_unknown``)
makes routes avoid that pair, banning neither; a worker that lost the session (restarted) is
opened again and replayed; a worker whose allowlist does not list this client is not asked again. Errors are accepted only from the route's hops, blaming themselves or
their successor; outputs are checked (shape, dtype, finite) before they are used.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import trio

from pymesh.client import probes
from pymesh.client.bans import BanCause
from pymesh.client.blame import Blame, SessionFailed, Verdict, judge_err, link_blame
from pymesh.client.blame import StepFailure as _StepFailure
from pymesh.client.replay import fetch_unsent_copies, replay
from pymesh.client.checks import output_problem_untrusted
from pymesh.client.receipt_check import (Finding, Hop, StepFacts, ParsedReceipts, check_step, copy_finding,
                                         parse_hop_untrusted)
from pymesh.client.recovery import HopKey, Link, OpenHop, RecoveryPlan, Replay, hop_key, plan
from pymesh.client.routing import SpanOption, hop_model
from pymesh.client.swarm import Swarm
from pymesh.client.verify import Conviction, Late, Verifier
from pymesh.errors import ConnectionClosed, PeerUnavailable, PymeshError
from pymesh.net.conn import RemoteError
from pymesh.proto import session_wire as sw
from pymesh.proto.frames import TensorBlob
from pymesh.proto.identity import PeerID
from pymesh.proto.receipts import tensor_digest

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)


__all__ = ["InferenceSession", "SessionFailed"]


@dataclass
class _Pending:
    step: int
    result: "Tensor | None"            # the last hop's output
    arrived: dict[int, float]        # hop start -> perf_counter at arrival (copies every step)
    error: Blame | None
    event: trio.Event
    input_digest: bytes = b""
    result_digest: bytes | None = None
    receipts: set[int] = field(default_factory=set)   # hop starts whose receipt for the step came


class InferenceSession:
    """Blocks ``[start, stop)`` for up to ``max_tokens`` positions; ``step(hidden) -> hidden``."""

    def __init__(self, swarm: Swarm, start: int, stop: int, max_tokens: int, *, batch: int = 1,
                 trust_record_cache: bool = True, copy_every: int | None = None) -> None:
        self.swarm = swarm
        #: skip workers whose record says their cache is full (records can be a heartbeat old;
        #: a worker that is full anyway refuses, and the client goes elsewhere)
        self.trust_record_cache = trust_record_cache
        self.start, self.stop = start, stop
        self.max_tokens = max_tokens
        self.batch = batch
        self.sid = os.urandom(16)
        self.route: list[SpanOption] = []
        #: block boundary -> step -> the input of the span starting there (for replay)
        self.history: dict[int, dict[int, Tensor]] = {}
        self.parsed_receipts = ParsedReceipts()   # each receipt reaches us twice a step
        settings = swarm.settings.client
        #: workers push their recovery copies every this many steps (1: every step, which
        #: also gives per-hop timings); unsent ones are fetched with pm.flush on recovery
        self.copy_every = copy_every or settings.copy_every
        self.shapes: list[tuple[int, int]] = []          # (start_pos, seq) per step
        self.length = 0
        self.recoveries: list[dict[str, Any]] = []
        self.step_timeout = settings.step_timeout
        #: a step still running after this long makes the client ask every hop for a sign of
        #: life (workers answer while they compute); one that stays silent is a failure
        self.probe_after = settings.probe_after
        self.probe_timeout = settings.probe_timeout
        self.max_recoveries = settings.max_recoveries
        self.last_hop_times: dict[int, float] = {}
        self._pending: _Pending | None = None
        #: every hop holding a session of ours and what it pushes to
        self.links: dict[HopKey, Link] = {}
        #: step -> (dtype, shape) of its input: what every hop's output must match
        self.expect: dict[int, tuple[str, tuple[int, ...]]] = {}
        #: verified inference (receipts, spot checks); with it on, copies come every step
        self.verifier = Verifier(self)
        if self.verifier.on:
            self.copy_every = 1
        self._current: tuple[int, int] = (0, 0)     # (pos, seq) of the step in flight

    # -- push sink (pushes arrive parsed by the swarm) ------------------------------------
    def on_err(self, peer: PeerID, err: sw.Err) -> None:
        p = self._pending
        if p is None or err.step != p.step or p.error is not None:
            return
        blame = judge_err(self.route, peer, err)  # only route hops, blaming themselves or their successor
        if blame is not None:
            p.error = blame
            p.event.set()

    def problem(self, k: int, blob: TensorBlob) -> str | None:
        if k not in self.expect:
            return f"an output for step {k}, which was never sent"
        return output_problem_untrusted(blob, *self.expect[k])

    def on_out(self, peer: PeerID, out: sw.Out, tensors: list[TensorBlob]) -> None:
        from pymesh.model.blobs import blob_to_tensor

        hop = next((o for o in self.route if o.peer == peer and o.start == out.start), None)
        if hop is None:
            return
        p = self._pending
        if self.verifier.on and not self._note_receipts(hop, out, tensors, p):
            return
        if out.final and hop is self.route[-1]:
            if p is not None and out.steps == (p.step,) and p.error is None:
                problem = self.problem(p.step, tensors[0])
                if problem is not None:
                    p.error = Blame(peer, f"{hop.describe()} sent a wrong answer for step {p.step}: {problem}",
                                    cause=BanCause.WRONG_ANSWER)
                    p.event.set()
                    return
                p.result = blob_to_tensor(tensors[0])
                p.result_digest = tensor_digest(tensors[0])
                if self.verifier.on:
                    self.history.setdefault(hop.stop, {})[p.step] = p.result
                p.arrived[hop.start] = time.perf_counter()
                self._maybe_done(p)
            return
        store = self.history.setdefault(hop.stop, {})
        for k, blob in zip(out.steps, tensors):
            problem = self.problem(k, blob)
            if problem is not None:  # not kept: a replay that needs it flushes or fails
                log.warning("Client: dropping %s's recovery copy of step %d: %s", hop.describe(), k, problem)
                continue
            store[k] = blob_to_tensor(blob)
            if p is not None and k == p.step:
                p.arrived[hop.start] = time.perf_counter()
                self._maybe_done(p)

    def _note_receipts(self, hop: SpanOption, out: sw.Out, tensors: list[TensorBlob], p: "_Pending | None") -> bool:
        """Keep a hop's receipts and check its copies against them; False: a conviction."""
        parsed = parse_hop_untrusted(hop.peer, out.rc, out.prc, self.parsed_receipts)
        finding = parsed if isinstance(parsed, Finding) else None
        if not isinstance(parsed, Finding):
            self.verifier.note(hop.start, out.step, parsed)
            for k, blob in zip(out.steps, tensors):
                got = self.verifier.receipt_of(hop.start, k)
                finding = finding or copy_finding(hop.peer, k, got.rc if got is not None else None,
                                                  tensor_digest(blob))
        if finding is not None:
            if p is not None and p.error is None:
                p.error = self._convicted(finding, p.step)
                p.event.set()
            return False
        if p is not None and out.step == p.step:
            p.receipts.add(hop.start)
        return True

    def _convicted(self, f: Finding, step: int) -> Blame:
        if f.peer not in self.swarm.current_bans():
            self.verifier.convict_finding(f, step)
        return Blame(f.peer, f"{f.kind}: {f.why}", Verdict.CONVICTED)

    def _maybe_done(self, p: _Pending) -> None:
        # With a copy every step (the network test) wait for every hop's copy too: the
        # per-hop timings need them. Otherwise the result alone completes the step.
        if p.result is None:
            return
        if self.verifier.on and len(p.receipts) < len(self.route):
            return
        if self.copy_every > 1 or len(p.arrived) >= len(self.route):
            p.event.set()

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> "InferenceSession":
        self.swarm.sinks[self.sid] = self
        try:
            await self._open_route()
        except BaseException:
            self.swarm.sinks.pop(self.sid, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.swarm.sinks.pop(self.sid, None)
        # the route, and any hop a recovery that gave up had opened already
        hops = {hop_key(o): o for o in [*self.route, *(link.hop for link in self.links.values())]}
        with trio.move_on_after(2):
            await self._close_hops(list(hops.values()))
        await self.verifier.close()

    async def _close_hops(self, hops: list[SpanOption]) -> None:
        async def one(o: SpanOption) -> None:
            try:
                await self.swarm.request(o, sw.Close(self.sid), timeout=2)
            except PymeshError:
                pass

        for o in hops:
            self.links.pop(hop_key(o), None)
        async with trio.open_nursery() as n:
            for o in hops:
                n.start_soon(one, o)

    def _next_hop(self, nxt: SpanOption | None) -> sw.NextHop | None:
        """``next`` as the wire carries it: a peer and its span; the address only as a hint
        (the worker dials what that peer's own record says)."""
        if nxt is None:
            return None
        hint = sw.AddrHint(nxt.host, nxt.port, self.swarm.transport) if nxt.host and nxt.port else None
        return sw.NextHop(nxt.peer, nxt.start, nxt.stop, hint)

    def _open_msg(self, op: OpenHop) -> sw.Open:
        o = op.hop
        model = hop_model(o, self.swarm.model_id)   # with --allow-mixed: the hop's own quantization
        return sw.Open(self.sid, self.max_tokens, self.batch, model, o.start, o.stop, reset=True,
                       copies=self.copy_every, next_hop=self._next_hop(op.next), prev=op.prev,
                       receipts=self.verifier.on)

    async def _open_route(self) -> None:
        """Choose a route and open a session on every hop; refused workers are avoided."""
        excluded: list[PeerID] = []
        last = ""
        for _ in range(self.max_recoveries + 1):
            need = self.max_tokens * self.batch if self.trust_record_cache else 0
            route = await self.swarm.find_route(self.start, self.stop, min_cache_tokens=need, exclude=excluded)
            self._log_route(route)
            p = plan([], route, self.links, self.history, 0, dead=set(self.swarm.banned))
            with trio.move_on_after(2):
                await self._close_hops(list(p.closes))  # left open by an attempt that failed
            failed = await self._open_hops(p.opens)
            if failed is None:
                self.route = route
                self.history = {route[0].start: {}}
                return
            await self._apply(failed, {}, 0)
            last = failed.why
            if failed.verdict in (Verdict.BAN, Verdict.AVOID):
                excluded.append(failed.peer)
        raise SessionFailed("could not open a session on any route: every candidate worker refused or failed "
                            f"(last: {last})")

    async def _open_hops(self, opens: Sequence[OpenHop]) -> Blame | None:
        """Open sessions (in the plan's order: last hop first); returns what failed, if any."""
        for op in opens:
            o, nxt = op.hop, op.next
            try:
                await self.swarm.request(o, self._open_msg(op))
                self.links[hop_key(o)] = Link(o, hop_key(nxt) if nxt is not None else None, op.prev)
            except PymeshError as exc:
                code = exc.code if isinstance(exc, RemoteError) else ""
                log.warning("Client: worker %s refused the session (%s): %s", o.peer.short(), code or "error", exc)
                link = link_blame(o, nxt, code, exc)
                if link is not None:
                    return link
                if code == sw.ErrorCode.NOT_LISTED:
                    self.swarm.not_listed_by(o.peer, str(exc))
                    return Blame(o.peer, f"does not list this client: {exc}", Verdict.AVOID)
                if code == sw.ErrorCode.REFUSED:
                    return Blame(o.peer, f"refused the session: {exc}", Verdict.AVOID)
                return probes.failure_of(o, "open_session", exc)
        return None

    def _log_route(self, route: list[SpanOption]) -> None:
        for o in route:
            for layer in range(o.start, o.stop):
                log.info("Client: found provider for layer %d: %s", layer, o.peer)
        log.info("Client: resolved chain: [%s]", ", ".join(f"{o.peer} ({o.start}-{o.stop - 1})" for o in route))

    # -- steps -----------------------------------------------------------------------------
    async def step(self, hidden: "Tensor") -> "Tensor":
        """Run one step (prefill chunk or one token) through the route; returns the last hop's output."""
        seq = int(hidden.shape[1])
        if self.length + seq > self.max_tokens:
            raise SessionFailed(f"step of {seq} tokens exceeds the session's {self.max_tokens} tokens")
        step = len(self.shapes)
        hidden = hidden.contiguous()
        self.history.setdefault(self.start, {})[step] = hidden
        self.expect[step] = (str(hidden.dtype).removeprefix("torch."), tuple(hidden.shape))
        self._current = (self.length, seq)
        for attempt in range(self.max_recoveries + 1):
            try:
                result = await self._run_step(step, self.length, hidden)
                await self._check_before_use(step, result)
                break
            except _StepFailure as failure:
                if attempt == self.max_recoveries:
                    raise SessionFailed(f"step {step} failed {attempt + 1} times; last: {failure.why}") from None
                await self._recover(failure, step)
        self.shapes.append((self.length, seq))
        self.length += seq
        return result

    def shapes_through(self, k: int) -> list[tuple[int, int]]:
        """(pos, seq) of steps 0..k (k may be the step in flight)."""
        return [*self.shapes, self._current][:k + 1]

    async def _check_before_use(self, step: int, result: "Tensor") -> None:
        """Verification: the receipts were checked with the step; now the spot checks due
        before the result is used (first step through an unchecked peer, or every hop with
        ``all``), then the sampled ones started in the background."""
        v = self.verifier
        if not v.on:
            return
        v.report.receipts_checked += len(self.route)
        now, later = v.plan(step, self.route, result)
        convictions: list[Conviction] = []

        async def one(o: SpanOption) -> None:
            try:
                await v.check(o, step, before_use=True)
            except Conviction as c:
                convictions.append(c)

        if now:
            async with trio.open_nursery() as n:
                for o in now:
                    n.start_soon(one, o)
        if convictions:
            first = min(convictions, key=lambda c: c.first_bad_step)
            if first.first_bad_step < step and (v.late is None or first.first_bad_step < v.late.first_bad_step):
                v.late = Late(first.peer, first.first_bad_step)
            raise _StepFailure(Blame(first.peer, first.why, Verdict.CONVICTED))
        for o in later:
            v.background(o, step)

    async def _run_step(self, step: int, pos: int, hidden: "Tensor") -> "Tensor":
        from pymesh.model.blobs import tensor_to_blob

        p = _Pending(step, None, {}, None, trio.Event())
        blob = tensor_to_blob(hidden)
        if self.verifier.on:
            p.input_digest = tensor_digest(blob)
        self._pending = p
        first = self.route[0]
        sent = time.perf_counter()
        try:
            log.info("Client: sending forward pass to %s", first.peer)
            with trio.move_on_after(self.step_timeout):
                try:
                    conn = await self.swarm.connect(first)
                    await conn.push(sw.STEP, sw.Step(self.sid, step, pos).to_meta(), [blob])
                    self.verifier.prefetch(self.route)  # checkers looked up while the step computes
                except (PeerUnavailable, ConnectionClosed, OSError) as exc:
                    # the client's own link to the first hop: re-dialled, the hop not banned
                    raise _StepFailure(Blame(first.peer, f"cannot reach the first worker: {exc}",
                                             Verdict.LINK)) from None
                while not p.event.is_set():
                    with trio.move_on_after(self.probe_after):
                        await p.event.wait()
                    if p.event.is_set():
                        break
                    problem = await probes.route_problem(self.swarm, self.sid, self.route, step,
                                                         self.probe_timeout)
                    if problem is not None and not p.event.is_set():
                        p.error = problem
                        break
        finally:
            self._pending = None
        if p.error is not None:
            raise _StepFailure(p.error)
        if p.result is None:
            culprit = await probes.stuck_hop(self.swarm, self.sid, self.route, step,
                                             min(5.0, max(self.step_timeout / 2, 0.5)))
            raise _StepFailure(Blame(culprit.peer, f"no result within {self.step_timeout:.0f} s; "
                                                   f"{culprit.describe()} did not get step {step} through"))
        if self.verifier.on:
            self._check_chain(p, pos, int(hidden.shape[1]))
        self.last_hop_times = {s: t - sent for s, t in p.arrived.items()}
        log.info("Client: received response for request_id %d", step)
        return p.result

    def _check_chain(self, p: _Pending, pos: int, seq: int) -> None:
        got = {o.start: self.verifier.receipt_of(o.start, p.step) for o in self.route}
        hops = {k: v for k, v in got.items() if v is not None}
        if len(hops) < len(self.route):  # cannot happen: the step waited for every receipt
            raise _StepFailure(Blame(self.route[0].peer, "receipts missing", Verdict.LINK))
        facts = StepFacts(self.swarm.model_id, self.sid, p.step, pos, seq)
        route = [Hop(o.peer, o.start, o.stop, hop_model(o, "")) for o in self.route]
        finding = check_step(facts, route, hops, p.input_digest, p.result_digest)
        if finding is not None:
            raise _StepFailure(self._convicted(finding, p.step))

    # -- recovery --------------------------------------------------------------------------
    async def _recover(self, failure: _StepFailure, step: int) -> None:
        """Ban the culprit, pick a new route keeping the healthy hops, and execute the plan
        that moves the session onto it (re-planned from where it stopped if it fails)."""
        t0 = time.perf_counter()
        #: hops whose cache holds steps 0..step-1: the route, plus hops replayed on the way
        ready: dict[HopKey, SpanOption] = {hop_key(o): o for o in self.route}
        before = set(ready)
        blame = await self._apply(failure.blame, ready, step)
        for _ in range(self.max_recoveries + 1):
            route = await self.swarm.find_route(self.start, self.stop, min_cache_tokens=0, prefer=list(ready))
            p = plan(list(ready.values()), route, self.links, self.history, step, dead=set(self.swarm.banned))
            if p.missing is not None:
                raise SessionFailed(p.missing.describe())
            try:
                await self._execute(p, step, ready)
                break
            except _StepFailure as exc:
                await self._apply(exc.blame, ready, step)
        else:
            raise SessionFailed(f"could not recover from: {failure.why}")
        self.route = route
        for k in [k for k, link in self.links.items() if link.hop.peer in self.swarm.banned]:
            del self.links[k]
        with trio.move_on_after(2):
            await self._close_hops([o for o in p.closes if o.peer not in self.swarm.banned])
        elapsed = time.perf_counter() - t0
        self.recoveries.append({"step": step, "blamed": str(blame.peer), "verdict": blame.verdict.value,
                                "why": blame.why,
                                "replaced": [o.describe() for o in route if hop_key(o) not in before],
                                "seconds": round(elapsed, 3)})
        log.warning("Client: recovered at step %d in %.2f s: new route [%s]", step, elapsed,
                    ", ".join(o.describe() for o in route))

    async def _apply(self, blame: Blame, ready: dict[HopKey, SpanOption], step: int) -> Blame:
        """Act on a failure before re-planning: ban the peer; or, for a failed link, drop
        the link (the hop is relinked, re-dialling) and keep the peer behind it if it still
        holds the session (banned if it does not answer us either); or forget the cache of a
        peer that lost the session. Returns the blame as it stands after the checks."""
        if blame.verdict is Verdict.CONVICTED:
            return blame  # banned for good when it was convicted
        if blame.verdict is Verdict.BAN:
            self.swarm.ban(blame.peer, blame.why, blame.cause)
            return blame
        if blame.verdict is Verdict.PAIR:
            assert blame.sender is not None
            self.swarm.avoid_pair(blame.sender.peer, blame.peer, blame.why)
            self.links.pop(hop_key(blame.sender), None)
            return blame
        self.swarm.deprioritise(blame.peer, blame.why)
        if blame.verdict is Verdict.AVOID:
            return blame
        if blame.sender is not None:
            self.links.pop(hop_key(blame.sender), None)
        for k, o in list(ready.items()):
            if o.peer != blame.peer or (blame.sender is not None and o.start != blame.sender.stop):
                continue
            if blame.verdict is Verdict.LINK:
                try:
                    steps = await probes.session_steps(self.swarm, self.sid, o, self.probe_timeout)
                except PymeshError as exc:  # silent to us as well: the peer, not only the link
                    blame = Blame(o.peer, f"{o.describe()} stopped answering after {blame.why} ({exc})",
                                  cause=BanCause.TIMEOUT)
                    self.swarm.ban(o.peer, blame.why, blame.cause)
                    return blame
                if steps is not None and steps >= step:
                    log.info("Client: %s still holds the session (%d steps): relinking to it", o.describe(), steps)
                    continue
            log.info("Client: %s lost the session; it will be opened and replayed", o.describe())
            del ready[k]
            for before in [h for h, link in self.links.items() if link.next == k]:
                del self.links[before]  # relinked: it re-dials the reopened hop
        return blame

    async def _execute(self, p: RecoveryPlan, step: int, ready: dict[HopKey, SpanOption]) -> None:
        """Open, re-link, flush, replay (the plan's I/O); a hop that fails raises _StepFailure."""
        bad = await self._open_hops(p.opens)
        if bad is not None:
            raise _StepFailure(bad)
        for link in p.relinks:
            nxt = link.next
            try:
                await self.swarm.request(link.hop, sw.SetNext(self.sid, self._next_hop(nxt), link.prev))
            except PymeshError as exc:
                code = exc.code if isinstance(exc, RemoteError) else ""
                raise _StepFailure(link_blame(link.hop, nxt, code, exc)
                                   or probes.failure_of(link.hop, "set_next", exc)) from None
            self.links[hop_key(link.hop)] = Link(link.hop, hop_key(nxt) if nxt is not None else None, link.prev)
        for f in p.flushes:
            await fetch_unsent_copies(self, f.source, f.boundary)
        for r in p.replays:
            await replay(self, r)
            ready[hop_key(r.hop)] = r.hop
