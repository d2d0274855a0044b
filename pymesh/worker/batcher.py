"""Continuous batching: the steps of different sessions that are ready together run as one forward.

A decode step reads every weight of the span to compute one row; eight sessions' rows
through the same weights cost little more than one. Every step goes through
:meth:`StepBatcher.step`: the step joins a pending list; when no task of the batcher holds
the device, its task claims it (then the runtime's lock) and takes *every* pending step (its
own and those that arrived while the previous forward ran) as one ragged batch
(:mod:`pymesh.model.ragged`) and computes it. The other tasks wait for that forward to end
and all resume in the same scheduler round, so in a worker every step of a batch pushes its
output on to the next hop before any of them sends its copy to the client. Nobody waits
for a batch to fill: a session alone runs at once, on the unbatched path (the decode fast
plan), with the same numbers as a worker without batching.

Taking only what is ready is not enough in a pipeline: sessions fall out of step into
small groups that travel the route apart and never merge (16 sessions through 3 workers
ran ~3.4 rows a forward). So a free device waits, briefly and only for steps that are due
(sessions stepping at a steady interval whose next step should arrive within the wait:
at most the last forward's time, at most ``MAX_HOLD``); the groups merge (~13 rows a
forward) and 16 sessions decode ~30% faster. A lone session never waits.

What one forward takes is bounded: decode rows first (one per session, up to
``max_decode``), then prefill with the tokens left of ``max_tokens``, so a long prompt
is cut into chunks (chunked prefill) and does not stall the others' decode; a prompt
that arrives alone runs whole. At most one step per session goes into a forward.
Order: priority (higher first), then arrival; a chunked prompt keeps its place.

A step may come with a check to run while it computes (``during``: the previous worker's
receipt, whose signature takes ~0.1-0.3 ms to verify): the task running the forward runs
the checks of its steps on the event loop while the compute thread works (the kernels
release the GIL), so they cost no time on the step's path. A check that raises fails its
step with that error; the step's output is dropped.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import trio

from pymesh.net.cadence import Cadence

if TYPE_CHECKING:
    import torch

    from pymesh.model.kv_cache import KVCache
    from pymesh.worker.runtime import Runtime

log = logging.getLogger(__name__)

#: tokens (rows) one batched forward takes at most: decode rows plus prefill chunks
DEFAULT_BATCH_TOKENS = 256
#: decode rows (sessions) one batched forward takes at most
MAX_DECODE_ROWS = 64
#: how long a free device may wait for steps due any moment: this fraction of the last
#: forward's time, and never more than MAX_HOLD seconds (see StepBatcher._hold). Measured
#: (16 sessions, 3 SmolLM2 workers, TCP, 2 cores): no hold 89 tok/s at 3.4 rows a forward;
#: 0.5 / 20 ms 104 tok/s at 5.5 rows; 1.0 / 50 ms 116 tok/s at 13 rows
HOLD_FRACTION = 1.0
MAX_HOLD = 0.05


@dataclass(eq=False)
class _Job:
    x: "torch.Tensor"              # [1, seq, hidden], the dtype the step came in
    cache: "KVCache"
    start: int
    priority: int
    order: int
    done: int = 0                  # rows computed so far (a chunked prefill)
    parts: list["torch.Tensor"] = field(default_factory=list)
    result: "torch.Tensor | None" = None
    error: BaseException | None = None
    during: "Callable[[], object] | None" = None   # run while the step computes (see the module doc)
    rejected: BaseException | None = None           # what ``during`` raised

    @property
    def rows(self) -> int:
        return int(self.x.shape[1])

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None


class StepBatcher:
    """The batching front of one :class:`Runtime` (see the module's docstring)."""

    def __init__(self, runtime: "Runtime", *, enabled: bool = True, max_tokens: int = DEFAULT_BATCH_TOKENS,
                 max_decode: int = MAX_DECODE_ROWS) -> None:
        self.runtime = runtime
        self.configure(enabled=enabled, max_tokens=max_tokens, max_decode=max_decode)
        self._pending: list[_Job] = []
        self._order = itertools.count()
        #: per session (its cache's id): when its last step arrived and the interval before it
        self.cadence = Cadence(prune_above=4 * MAX_DECODE_ROWS)
        #: a task of this batcher holds the device (running a forward or holding for one);
        #: the others wait on ``_changed``, set when it ends, instead of queueing on the
        #: device lock: every step of a forward resumes in the same scheduler round, so each
        #: pushes its output on before any sends its copy to the client (through the lock they
        #: woke one round apart, and the next hop's last input waited for the earlier copies)
        self._running = False
        self._changed = trio.Event()
        self._last_forward_s = 0.0
        #: forwards run
        self.forwards = 0

    def configure(self, *, enabled: bool, max_tokens: int, max_decode: int = MAX_DECODE_ROWS) -> None:
        """``--no-batching`` / ``--batch-tokens`` (WorkerSettings.batching, .batch_tokens)."""
        self.enabled = enabled
        self.max_tokens = max(1, max_tokens)
        self.max_decode = max(1, min(max_decode, self.max_tokens))

    async def step(self, x: "torch.Tensor", cache: "KVCache | None", start_pos: int, *, priority: int = 0,
                   observe: Callable[[int], None] | None = None,
                   during: Callable[[], object] | None = None) -> "torch.Tensor":
        """``runtime.forward(x, cache, start_pos)``, batched with whatever else is ready;
        ``during`` runs while it computes (its error is the step's)."""
        rt = self.runtime
        if not self.enabled or rt.echo or cache is None or x.shape[0] != 1 or cache.batch != 1:
            if during is not None:
                during()
            if observe is not None:
                observe(int(x.shape[0]) * int(x.shape[1]))
            self.forwards += 1
            return await rt.run(lambda: rt.forward(x, cache, start_pos))
        job = _Job(x, cache, start_pos, priority, next(self._order), during=during)
        self._pending.append(job)
        self.cadence.note(id(cache))
        try:
            while not job.finished:
                if self._running:  # woken with every step of the forward in progress when it ends
                    await self._changed.wait()
                    if not job.finished:
                        # one more round: the steps that forward finished queue their sessions'
                        # next steps first (in-process callers do at once), so a chunked prompt
                        # left alone for an instant is still cut beside them
                        await trio.lowlevel.checkpoint()
                    continue
                self._running = True     # claimed before any checkpoint: one runner at a time
                try:
                    async with rt.device_lock:
                        await self._hold()
                        batch = self._take()
                        if observe is not None:
                            observe(sum(n for _, n in batch))
                        await self._run(batch)
                finally:
                    self._running = False
                    self._pending = [j for j in self._pending if not j.finished]
                    self._changed.set()
                    self._changed = trio.Event()
                # resume in the round the steps it woke resume in, not one ahead of them
                await trio.lowlevel.checkpoint()
        finally:
            if job in self._pending:
                self._pending.remove(job)
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    async def _hold(self) -> None:
        """Sessions out of step form small batches that never merge: a device that takes only
        what is ready keeps them apart forever. So before a forward, wait (at most
        HOLD_FRACTION of the last forward, at most MAX_HOLD) for steps that are due
        (:class:`pymesh.net.cadence.Cadence`: a lone session or one that went quiet is not
        waited for)."""
        await self.cadence.hold(min(MAX_HOLD, HOLD_FRACTION * self._last_forward_s),
                                lambda: {id(j.cache) for j in self._pending})

    async def _run(self, batch: list[tuple[_Job, int]]) -> None:
        """Compute ``batch`` in a thread; meanwhile run its steps' checks here. Like
        ``trio.to_thread.run_sync``, a cancelled caller still waits for the thread."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[Any] = []

        def deliver(outcome: Any) -> None:  # in the thread
            box.append(outcome)
            token.run_sync_soon(done.set)

        t0 = trio.current_time()
        trio.lowlevel.start_thread_soon(lambda: self._compute(batch), deliver)
        for job, _ in batch:
            check, job.during = job.during, None
            if check is not None:
                try:
                    check()
                except Exception as exc:  # noqa: BLE001 - the step's error, raised by its owner
                    job.rejected = exc
        with trio.CancelScope(shield=True):
            await done.wait()
        self._last_forward_s = trio.current_time() - t0
        for job, _ in batch:
            if job.rejected is not None:
                job.error, job.result, job.parts = job.rejected, None, []
        box[0].unwrap()

    def _take(self) -> list[tuple[_Job, int]]:
        """The steps of the next forward and how many of each one's rows (see the module doc)."""
        order = sorted(self._pending, key=lambda j: (-j.priority, j.order))
        if len(order) == 1:
            job = order[0]
            return [(job, job.rows - job.done)]
        batch: list[tuple[_Job, int]] = []
        caches: set[int] = set()
        budget = self.max_tokens
        for decode in (True, False):
            for job in order:
                left = job.rows - job.done
                if (left == 1 and job.done == 0) != decode or id(job.cache) in caches:
                    continue
                if decode and len(batch) >= self.max_decode:
                    break
                take = min(left, budget)
                if take <= 0:
                    break
                batch.append((job, take))
                caches.add(id(job.cache))
                budget -= take
        return batch

    def _compute(self, batch: list[tuple[_Job, int]]) -> None:
        """Run one forward (in the compute thread) and hand each job its rows."""
        import torch

        rt = self.runtime
        self.forwards += 1
        whole = len(batch) == 1 and batch[0][0].done == 0 and batch[0][1] == batch[0][0].rows
        try:
            if whole:
                job = batch[0][0]
                job.result = rt.forward(job.x, job.cache, job.start)
                return
            outs = rt.forward_ragged([(job.x[:, job.done:job.done + n], job.cache, job.start + job.done)
                                      for job, n in batch])
        except Exception as exc:  # noqa: BLE001 - each job's caller gets the error (a step's, not ours)
            if len(batch) > 1:
                log.warning("a batched forward of %d steps failed (%s); running them one by one", len(batch), exc)
                for job, _ in batch:
                    self._compute([(job, job.rows - job.done)])
                return
            for job, _ in batch:
                job.error = exc
            return
        for (job, n), y in zip(batch, outs):
            job.parts.append(y)
            job.done += n
            if job.done == job.rows:
                job.result = job.parts[0] if len(job.parts) == 1 else torch.cat(job.parts, dim=1)
                job.parts = []
