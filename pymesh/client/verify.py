"""Verified inference, the client's side: receipts checked every step, outputs spot-checked.

One :class:`Verifier` per inference session (``--verify off|sample|all``):

- **Receipts, every step** (:mod:`pymesh.client.receipt_check`): each hop's signed receipt
  and the one its input came with; a chain that does not hold convicts the one peer whose
  own signed statements contradict each other or its tensors (an equivocation is caught on
  the step it happens).
- **Spot checks**: a hop's output for a step is re-computed on another worker serving the
  same blocks (:class:`pymesh.client.shadow.Shadow`) and compared within the tolerance of
  the two dtypes and the span length (:mod:`pymesh.client.tolerance`). The first step
  through a peer this client has not checked yet is checked *before* its output is used;
  with ``sample`` every other hop-step is checked with probability ``verify_rate``, in the
  background; with ``all`` every hop-step, before use.
- **Verdicts**: on a mismatch a third provider re-runs the span; the one of the two that
  disagrees with it is convicted (banned for the client's life, written to the blocklist with
  its evidence). With no third provider, or when it agrees with neither, nobody is banned and
  the answer is marked *unverified*. A conviction that comes after tokens were emitted
  (a background check) names the first step whose output was wrong (every earlier step of
  the convicted hop is compared too); the generation is recomputed from there.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from pymesh.client.receipt_check import Finding, HopReceipts
from pymesh.client.routing import SpanOption, hop_model
from pymesh.client.shadow import CheckInconclusive, Shadow, alternative_route
from pymesh.errors import PymeshError
from pymesh.proto.identity import PeerID

if TYPE_CHECKING:
    from torch import Tensor

    from pymesh.client.blocklist import Evidence
    from pymesh.client.session import InferenceSession

log = logging.getLogger(__name__)

#: background checks one session may have waiting at once (more samples are skipped, counted)
MAX_PENDING = 16
#: seconds before a span that had no checker is looked up again (spares may join)
NO_CHECKER_RETRY = 5.0


@dataclass
class VerifyReport:
    """What verification did for one generation (``--json``'s ``verification``)."""

    mode: str = "off"
    rate: float = 0.0
    receipts_checked: int = 0          # hop-steps whose receipts were checked
    checks: int = 0                    # hop-steps re-computed on a checker and compared
    mismatches: int = 0                # checks whose outputs disagreed beyond tolerance
    inconclusive: int = 0              # checks that could not be completed (no checker, ...)
    skipped: int = 0                   # sampled checks dropped (too many waiting)
    convicted: list[dict[str, Any]] = field(default_factory=list)
    disagreements: list[dict[str, Any]] = field(default_factory=list)
    recomputed: list[dict[str, Any]] = field(default_factory=list)
    unverified: bool = False           # a disagreement nobody could settle, or a hop never checked

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "rate": self.rate, "receipts_checked": self.receipts_checked,
                "checks": self.checks, "mismatches": self.mismatches, "inconclusive": self.inconclusive,
                "skipped": self.skipped, "convicted": list(self.convicted),
                "disagreements": list(self.disagreements), "recomputed": list(self.recomputed),
                "unverified": self.unverified}

    def merge(self, other: "VerifyReport") -> None:
        for name in ("receipts_checked", "checks", "mismatches", "inconclusive", "skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.convicted += other.convicted
        self.disagreements += other.disagreements
        self.recomputed += other.recomputed
        self.unverified = self.unverified or other.unverified


@dataclass(frozen=True)
class Late:
    """A conviction that came after the convicted hop's outputs were used."""

    peer: PeerID
    first_bad_step: int


class Conviction(PymeshError):
    """A check convicted ``peer`` (raised to the session for a check made before use)."""

    def __init__(self, peer: PeerID, why: str, first_bad_step: int) -> None:
        super().__init__(why)
        self.peer = peer
        self.why = why
        self.first_bad_step = first_bad_step


class Verifier:
    def __init__(self, session: "InferenceSession") -> None:
        c = session.swarm.settings.client
        self.session = session
        self.swarm = session.swarm
        self.mode = c.verify
        self.rate = c.verify_rate
        #: which hop-steps get checked must not be predictable by workers
        self.rng = random.SystemRandom()
        self.report = VerifyReport(mode=self.mode, rate=self.rate if self.mode == "sample" else
                                   (1.0 if self.mode == "all" else 0.0))
        #: hop start -> step -> what that hop sent
        self.receipts: dict[int, dict[int, HopReceipts]] = {}
        self.shadows: dict[tuple[int, int], Shadow] = {}
        self.late: Late | None = None
        self._pending = 0
        #: span -> monotonic time until which no checker is looked up again (none was found)
        self._no_checker: dict[tuple[int, int], float] = {}
        #: span -> set when the lookup of its checker in progress ends (one lookup at a time)
        self._lookups: dict[tuple[int, int], trio.Event] = {}
        self._warned: set[tuple[int, int]] = set()
        self._idle = trio.Event()
        self._idle.set()
        from pymesh.client.magnitude import MagnitudeGuard

        self.guard = MagnitudeGuard()

    @property
    def on(self) -> bool:
        return self.mode != "off"

    # -- per step ----------------------------------------------------------------------
    def note(self, start: int, step: int, hop: HopReceipts) -> None:
        self.receipts.setdefault(start, {})[step] = hop

    def receipt_of(self, start: int, step: int) -> HopReceipts | None:
        return self.receipts.get(start, {}).get(step)

    def plan(self, step: int, route: list[SpanOption], result: "Tensor") -> tuple[list[SpanOption], list[SpanOption]]:
        """Which hops to check for ``step``: (before the result is used, in the background)."""
        if self.mode == "off":
            return [], []
        if self.mode == "all":
            return list(route), []
        now, later = [], []
        suspicious = self.guard.problem(route[-1].stop, result)
        for o in route:
            if o.peer not in self.swarm.checked or (suspicious is not None and o is route[-1]):
                now.append(o)
            elif self.rng.random() < self.rate:
                later.append(o)
        if suspicious is not None:
            log.warning("Client: step %d's result looks wrong (%s): checking %s before using it", step, suspicious,
                        route[-1].describe())
        return now, later

    def prefetch(self, route: list[SpanOption]) -> None:
        """Look up checkers for the hops of ``route`` not checked yet, in the background, while
        the step just sent computes: the first step through such a hop is checked before its
        result is used, and its lookup (~18 ms for three hops here) was added to that step,
        the prompt's, so to the time to the first token."""
        nursery = self.swarm.tasks
        if self.mode == "off" or nursery is None:
            return
        now = trio.current_time()
        for o in route:
            key = (o.start, o.stop)
            if o.peer in self.swarm.checked or key in self._lookups or key in self.shadows \
                    or self._no_checker.get(key, -1.0) > now:
                continue
            nursery.start_soon(self._prefetch, o)

    async def _prefetch(self, o: SpanOption) -> None:
        try:
            await self._shadow(o)
        except Exception as exc:  # noqa: BLE001 - only a head start: the check looks up again
            log.debug("Client: looking up a checker for %s failed: %r", o.describe(), exc)

    def background(self, o: SpanOption, step: int) -> None:
        nursery = self.swarm.tasks
        if nursery is None or self._pending >= MAX_PENDING:
            self.report.skipped += 1
            return
        self._pending += 1
        self._idle = trio.Event()
        nursery.start_soon(self._background, o, step)

    async def _background(self, o: SpanOption, step: int) -> None:
        try:
            await self.check(o, step, before_use=False)
        except Conviction as c:
            if self.late is None or c.first_bad_step < self.late.first_bad_step:
                self.late = Late(c.peer, c.first_bad_step)
        except Exception as exc:  # a background check must never take the client down
            log.warning("Client: spot check of %s at step %d failed: %r", o.describe(), step, exc)
            self.report.inconclusive += 1
        finally:
            self._pending -= 1
            if self._pending == 0:
                self._idle.set()

    async def settle(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for this session's background checks."""
        with trio.move_on_after(timeout):
            await self._idle.wait()
        if self._pending:
            log.warning("Client: %d spot check(s) still running after %.0f s; the answer is reported unverified",
                        self._pending, timeout)
            self.report.unverified = True

    async def close(self) -> None:
        for shadow in list(self.shadows.values()):
            await shadow.close()
        self.shadows.clear()

    # -- one check ---------------------------------------------------------------------
    async def check(self, o: SpanOption, k: int, *, before_use: bool) -> None:
        """Re-run hop ``o``'s step ``k`` elsewhere and judge; raises :class:`Conviction` when
        ``o`` is convicted (a checker that lost the vote is convicted quietly)."""
        try:
            # the checker first: without one there is nothing to gather (this runs every step
            # of a hop that was never checked, so it must not cost work that grows with k)
            shadow = await self._shadow(o)
            if shadow is None:
                self._unverifiable(o, k, "no other worker serves these blocks: nobody to check it against")
                return
            fed = shadow.fed
            inputs, out = await self._material(o, min(fed, k), k)
            await shadow.advance(k, inputs, self.session.shapes_through(k))
        except CheckInconclusive as exc:
            self.report.inconclusive += 1
            self.report.unverified = True
            log.warning("Client: could not check %s at step %d: %s", o.describe(), k, exc)
            self._drop_shadow(o)
            return
        if self.late is not None:
            # a conviction already condemned this session's output from an earlier step: the
            # generation starts over from there, and the stored tensors may now mix outputs
            # computed before and after the liar was replaced (a recovery's replays rewrite
            # the boundaries they pass): judging them could blame an honest worker
            self.report.skipped += 1
            return
        # the checker computed steps fed..k in one chunk: compare all of them that ``o``
        # computed (its receipts say so), not only the sampled one; it costs a comparison each
        for j, mine in [*self._also_computed(o, range(fed, k)), (k, out)]:
            verdict = self._compare(o, j, mine, shadow.outputs[j], shadow)
            self.report.checks += 1
            if verdict.ok:
                self.guard.learn(o.stop, mine)
                continue
            self.report.mismatches += 1
            log.warning("Client: %s and checker %s disagree at step %d (error %.3g > tolerance %.3g); asking a "
                        "third worker", o.describe(), shadow.describe(), j, verdict.error, verdict.tolerance)
            try:
                inputs = await self._boundary(o.start, range(j + 1))
            except CheckInconclusive as exc:
                self.report.inconclusive += 1
                self.report.unverified = True
                log.warning("Client: cannot ask a third worker about %s at step %d: %s", o.describe(), j, exc)
                return
            await self._referee(o, j, {i: inputs[i] for i in range(j + 1)}, mine, shadow, verdict.error)
            return
        self.swarm.checked.add(o.peer)

    def _also_computed(self, o: SpanOption, steps: range) -> list[tuple[int, "Tensor"]]:
        """(step, output) of the ``steps`` whose stored output at ``o.stop`` came with a
        receipt signed by ``o``'s peer (steps before a recovery may be another worker's)."""
        outs = self.session.history.get(o.stop, {})
        got = []
        for j in steps:
            hop = self.receipt_of(o.start, j)
            if hop is not None and hop.rc.receipt.peer == o.peer and j in outs:
                got.append((j, outs[j]))
        return got

    async def _material(self, o: SpanOption, first: int, k: int) -> tuple[dict[int, "Tensor"], "Tensor"]:
        """The hop's stored inputs (present for steps ``first..k``: the checker has the earlier
        ones) and its output at k, each checked against the receipts of the hops that sent them."""
        inputs = await self._boundary(o.start, range(first, k + 1))
        outs = await self._boundary(o.stop, [k])
        return inputs, outs[k]

    async def _boundary(self, boundary: int, steps: "range | list[int]") -> dict[int, "Tensor"]:
        """The stored tensors at a block boundary (the client's inputs at the route's start, else
        copies checked against their senders' receipts on arrival), with ``steps`` present:
        missing ones are flushed from the route's hop ending there. The store itself, not a
        copy (a checker compares what it was fed with it to see replaced inputs)."""
        from pymesh.client.blame import StepFailure
        from pymesh.client.replay import fetch_unsent_copies

        s = self.session
        store = s.history.get(boundary, {})
        if any(j not in store for j in steps) and boundary != s.start:
            source = next((o for o in s.route if o.stop == boundary), None)
            if source is not None:
                try:
                    await fetch_unsent_copies(s, source, boundary)
                except StepFailure as exc:
                    raise CheckInconclusive(f"could not fetch the outputs at block {boundary}: {exc.why}") from None
            store = s.history.get(boundary, {})
        missing = [j for j in steps if j not in store]
        if missing:
            raise CheckInconclusive(f"no stored output of step {missing[0]} at block {boundary}")
        return store

    async def _shadow(self, o: SpanOption) -> Shadow | None:
        key = (o.start, o.stop)
        while (pending := self._lookups.get(key)) is not None:  # use the lookup in progress
            await pending.wait()
        shadow = self.shadows.get(key)
        if shadow is not None and o.peer not in {x.peer for x in shadow.route} \
                and not any(x.peer in self.swarm.current_bans() for x in shadow.route):
            return shadow
        s = self.session
        now = trio.current_time()
        if self._no_checker.get(key, -1.0) > now:
            return None
        done = self._lookups[key] = trio.Event()
        try:
            route = await alternative_route(self.swarm, o.start, o.stop, [o.peer], s.max_tokens * s.batch,
                                            hop_model(o, self.swarm.model_id))
            if route is None:
                self._no_checker[key] = now + NO_CHECKER_RETRY
                return None
            shadow = Shadow(self.swarm, route, s.max_tokens, s.batch, s.step_timeout)
            old = self.shadows.pop(key, None)
            if old is not None:
                await old.close()
            self.shadows[key] = shadow
            return shadow
        finally:
            del self._lookups[key]
            done.set()

    def _drop_shadow(self, o: SpanOption) -> None:
        shadow = self.shadows.pop((o.start, o.stop), None)
        if shadow is not None and self.swarm.tasks is not None:
            self.swarm.tasks.start_soon(shadow.close)

    def _compare(self, o: SpanOption, k: int, out: "Tensor", ref: "Tensor", shadow: Shadow) -> Any:
        from pymesh.client.tolerance import compare

        hop = self.receipt_of(o.start, k)
        dtype = hop.rc.receipt.dtype if hop is not None else "float32"
        device = hop.rc.receipt.device if hop is not None else "cpu"
        return compare(out, ref, dtype, shadow.dtype, o.stop - o.start, device, shadow.device)

    def _unverifiable(self, o: SpanOption, k: int, why: str) -> None:
        self.report.inconclusive += 1
        self.report.unverified = True
        if (o.start, o.stop) not in self._warned:
            self._warned.add((o.start, o.stop))
            log.warning("Client: cannot check %s at step %d: %s; the answer is unverified", o.describe(), k, why)

    async def _referee(self, o: SpanOption, k: int, inputs: dict[int, "Tensor"], out: "Tensor", checker: Shadow,
                       error: float) -> None:
        s = self.session
        exclude = [o.peer, *(x.peer for x in checker.route)]
        route = await alternative_route(self.swarm, o.start, o.stop, exclude, s.max_tokens * s.batch,
                                        hop_model(o, self.swarm.model_id))
        record = {"step": k, "hop": o.describe(), "checker": checker.describe(), "error": error}
        if route is None:
            self._disagree(record, "no third worker serves these blocks: nobody banned")
            return
        referee = Shadow(self.swarm, route, s.max_tokens, s.batch, s.step_timeout)
        try:
            await referee.advance(k, inputs, s.shapes_through(k))
        except CheckInconclusive as exc:
            self._disagree(record, f"the third worker failed: {exc}")
            await referee.close()
            return
        ref = referee.outputs[k]
        hop_ok = self._compare(o, k, out, ref, referee).ok
        checker_ok = self._compare_shadows(checker, referee, k, o.stop - o.start)
        record["referee"] = referee.describe()
        if not hop_ok and checker_ok:
            await self._close_and_swap(o, referee)
            self.swarm.checked.discard(o.peer)
            first = self._first_bad(o, k, referee)
            await self._convict(o, k, first, out, referee, checker, error)
            return
        if hop_ok and not checker_ok:
            self.swarm.checked.add(o.peer)
            await self._close_and_swap(o, referee)
            if len(checker.route) == 1:
                c = checker.route[0]
                ev = self._evidence(c.peer, "spot_check", f"as checker of blocks {o.start}-{o.stop - 1} at step {k} "
                                    "it disagreed with the checked worker and a third one, who agreed",
                                    checker.receipts, {"checker_output": checker.outputs[k], "referee_output": ref},
                                    record)
                self._record_conviction(c.peer, "checker lost the vote", k, ev)
            return
        await referee.close()
        self._disagree(record, "the third worker agrees with " + ("both" if hop_ok else "neither"))

    def _compare_shadows(self, a: Shadow, b: Shadow, k: int, blocks: int) -> bool:
        from pymesh.client.tolerance import compare

        return compare(a.outputs[k], b.outputs[k], a.dtype, b.dtype, blocks, a.device, b.device).ok

    async def _close_and_swap(self, o: SpanOption, referee: Shadow) -> None:
        old = self.shadows.pop((o.start, o.stop), None)
        self.shadows[(o.start, o.stop)] = referee
        if old is not None:
            await old.close()

    def _first_bad(self, o: SpanOption, k: int, ref: Shadow) -> int:
        """The first step at or before ``k`` whose output from ``o`` is outside tolerance."""
        from pymesh.client.tolerance import compare

        outs = self.session.history.get(o.stop, {})
        hop = self.receipt_of(o.start, k)
        dtype = hop.rc.receipt.dtype if hop is not None else "float32"
        for j in range(k + 1):
            mine = outs.get(j)
            if mine is None or j not in ref.outputs:
                return j
            if not compare(mine, ref.outputs[j], dtype, ref.dtype, o.stop - o.start).ok:
                return j
        return k

    async def _convict(self, o: SpanOption, k: int, first: int, out: "Tensor", referee: Shadow, checker: Shadow,
                       error: float) -> None:
        why = (f"its output for blocks {o.start}-{o.stop - 1} at step {k} (error {error:.3g}) disagrees with "
               f"two other workers ({checker.describe()}, {referee.describe()}) who agree with each other")
        hop = self.receipt_of(o.start, k)
        # the conviction stands on the tensors; its receipt is evidence only if it verifies
        receipts = [hop.rc.wire] if hop is not None and hop.rc.signature_ok() else []
        import torch

        inputs = self.session.history.get(o.start, {})
        chunk = torch.cat([inputs[j] for j in range(k + 1)], dim=1) if all(j in inputs for j in range(k + 1)) \
            else out.new_zeros(0)
        ev = self._evidence(o.peer, "spot_check", why, receipts + checker.receipts + referee.receipts,
                            {"input_steps_0_to_k": chunk, "output": out, "checker_output": checker.outputs[k],
                             "referee_output": referee.outputs[k]},
                            {"step": k, "first_bad_step": first, "span": [o.start, o.stop], "error": error})
        self._record_conviction(o.peer, why, first, ev)
        raise Conviction(o.peer, why, first)

    def _disagree(self, record: dict[str, Any], why: str) -> None:
        record["outcome"] = why
        self.report.disagreements.append(record)
        self.report.unverified = True
        log.warning("Client: unsettled disagreement at step %s between %s and %s: %s; the answer is unverified",
                    record["step"], record["hop"], record["checker"], why)

    def _evidence(self, peer: PeerID, kind: str, why: str, receipts: list[bytes], tensors: dict[str, "Tensor"],
                  detail: dict[str, Any]) -> "Evidence":
        from pymesh.client.blocklist import Evidence

        return Evidence(peer=peer, kind=kind, why=why, receipts=list(receipts),
                        tensors={k: v.detach().contiguous() for k, v in tensors.items()}, detail=detail)

    def _record_conviction(self, peer: PeerID, why: str, first: int, ev: "Evidence | None") -> None:
        path = self.swarm.convict(peer, why, ev)
        self.report.convicted.append({"peer": str(peer), "why": why, "first_bad_step": first,
                                      "evidence": str(path) if path is not None else None})

    def convict_finding(self, f: Finding, step: int) -> None:
        """A receipt chain violation: the finding's peer is convicted on its signatures."""
        ev = self._evidence(f.peer, f.kind, f.why, list(f.receipts), {}, {"step": step})
        self._record_conviction(f.peer, f"{f.kind}: {f.why}", step, ev)
