"""The LM head and sampling of one client process's sessions, run batched.

Every session of a client process (``generate_tokens``, the HTTP API's requests) ends each
step the same way: final norm + LM head over its last hidden row, its own sampler picks a
token, the token is embedded for the next step. Per session that is one pass through the LM
head (SmolLM2-135M: 49152 x 576 floats, 113 MB read per pass); 16 sessions stepping together
would read it 16 times. :class:`HeadBatcher` stacks the rows that are ready together and runs
them as one ``logits_rows`` (one matmul), then each session's own sampler picks from its row
(per-session parameters, seeds and repetition penalties stay per session), then the picked
tokens are embedded in one call.

Scheduling: a request waits only for company that is due. When the batcher's compute thread
is idle the request runs (after one trio scheduler round, so that tasks woken in the same round
join it), alone if it is alone; requests that arrive while a batch computes queue and form
the next batch, in arrival order (FIFO), at most ``max_rows`` of them. Sessions stepping
together get their results one by one (the last worker pushes them one after the other), so
before a pass the runner waits, at most the last pass's time and at most ``MAX_HOLD``, for
the sessions whose next request is due within that wait (:class:`pymesh.net.cadence.Cadence`,
keyed by each session's sampler): 16 sessions whose results arrived over ~6 ms ran as two
passes (5 + 11 rows, 28 ms) instead of one (16 rows, 18 ms). A lone session, or one that
went quiet, is never waited for. At most
``max_queued`` requests wait; one more is refused (:class:`HeadQueueFull`). There is no background task: whichever
waiting request finds the thread idle runs the next batch (a cancelled runner still lets its
batch finish, and the others then take over).

One batcher serves one trio run at a time per "lane"; a second trio run in the same process
(``SwarmClient``'s sync flavour beside an async one) gets a lane of its own.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import trio

from pymesh.errors import PymeshError
from pymesh.model.shapes import ShapeError
from pymesh.net.cadence import Cadence

if TYPE_CHECKING:
    import torch

    from pymesh.model.head import ClientHead
    from pymesh.model.sampling import Sampler

log = logging.getLogger(__name__)

#: rows per head pass at most: beyond a few dozen rows the pass is compute-bound, not
#: weight-read-bound, so bigger batches only add latency to the rows at the front
MAX_ROWS = 64
MAX_QUEUED = 4096
#: seconds a pass waits at most for requests that are due (see the module doc)
MAX_HOLD = 0.02
#: trio runs whose pace is remembered
MAX_RUNS = 8


class HeadQueueFull(PymeshError):
    """More sessions of one client process wait for its LM head than it queues."""


@dataclass
class Pick:
    """One session's step through the head: its token, the token's embedding (the next
    step's input, ``[1, 1, hidden]``) when asked for, logprobs when asked for, and how many
    rows the head pass that computed it had."""

    token: int
    hidden: "torch.Tensor | None" = None
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    rows: int = 1


@dataclass(eq=False)
class _Request:
    row: "torch.Tensor"
    sampler: "Sampler"
    history: list[int]
    embed: bool
    top_logprobs: int | None
    result: Pick | None = None
    error: BaseException | None = None
    finished: bool = False


@dataclass
class _Pace:
    """When the sessions of one trio run ask for the head, and how long the last pass took."""

    cadence: Cadence = field(default_factory=Cadence)
    last_pass_s: float = 0.0


@dataclass(eq=False)
class _Lane:
    """The queue of one trio run."""

    limiter: trio.CapacityLimiter
    queue: deque[_Request] = field(default_factory=deque)
    busy: bool = False
    changed: trio.Event = field(default_factory=trio.Event)
    pace: _Pace = field(default_factory=_Pace)

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class HeadBatcher:
    """Batched LM head + per-session sampling for the sessions of one client process."""

    def __init__(self, head: "ClientHead", *, max_rows: int = MAX_ROWS, max_queued: int = MAX_QUEUED) -> None:
        if max_rows < 1 or max_queued < 1:
            raise ValueError(f"max_rows ({max_rows}) and max_queued ({max_queued}) must be at least 1")
        self.head = head
        self.max_rows = max_rows
        self.max_queued = max_queued
        #: rows per head pass -> how many passes had that many rows
        self.batch_rows: Counter[int] = Counter()
        #: called after each pass with (rows, seconds of the pass), in the trio thread
        self.observers: list[Callable[[int, float], None]] = []
        self._lanes: dict[trio.lowlevel.TrioToken, _Lane] = {}
        #: per trio run, its sessions' cadence and the last pass's time (outlive idle lanes)
        self._paces: OrderedDict[trio.lowlevel.TrioToken, _Pace] = OrderedDict()

    def _pace(self, token: trio.lowlevel.TrioToken) -> "_Pace":
        pace = self._paces.get(token)
        if pace is None:
            pace = self._paces[token] = _Pace()
            while len(self._paces) > MAX_RUNS:  # runs that ended (SwarmClient's sync calls)
                self._paces.popitem(last=False)
        self._paces.move_to_end(token)
        return pace

    async def pick(self, row: "torch.Tensor", sampler: "Sampler", history: list[int], *, embed: bool = True,
                   top_logprobs: int | None = None) -> Pick:
        """The next token for a session whose last hidden row is ``row`` (``[hidden]``),
        chosen by its ``sampler`` given its ``history`` (prompt + tokens so far, read for the
        repetition penalty; not changed here). ``embed``: also embed the token.
        ``top_logprobs``: None = no logprobs; else the token's logprob and that many top
        alternatives (log-softmax of the raw logits, before penalty and temperature)."""
        size = self.head.config.hidden_size
        if tuple(row.shape) != (size,):
            raise ShapeError(f"the head takes one hidden row of shape [{size}], got {list(row.shape)}")
        req = _Request(row, sampler, history, embed, top_logprobs)
        token = trio.lowlevel.current_trio_token()
        lane = self._lanes.get(token)
        if lane is None:
            lane = self._lanes[token] = _Lane(trio.CapacityLimiter(1), pace=self._pace(token))
        if len(lane.queue) >= self.max_queued:
            raise HeadQueueFull(f"{len(lane.queue)} sessions of this client process are already waiting for "
                                "its LM head (the most it queues); run fewer sessions at once in one process "
                                "(pymesh serve: --max-active)")
        lane.queue.append(req)
        lane.pace.cadence.note(id(sampler))
        try:
            while not req.finished:
                if lane.busy:
                    await lane.changed.wait()
                    continue
                # one scheduler round (no sleep): sessions woken together with this one (results
                # of one worker read, one released barrier) join this pass instead of the next
                await trio.lowlevel.checkpoint()
                if not lane.busy and not req.finished:
                    await self._run_batch(lane)
        finally:
            if not req.finished:     # cancelled while queued: leave the queue
                try:
                    lane.queue.remove(req)
                except ValueError:
                    pass
            self._drop_if_idle(token, lane)
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    async def embed_prompt(self, ids: list[int]) -> "torch.Tensor":
        """A session's first input: the prompt's embeddings ``[1, len(ids), hidden]`` (in a
        worker thread; prompts differ in length, so they are not batched)."""
        import torch

        def embed() -> "torch.Tensor":
            with torch.inference_mode():
                return self.head.embed(torch.tensor([ids])).contiguous()

        return await trio.to_thread.run_sync(embed)

    def _drop_if_idle(self, token: trio.lowlevel.TrioToken, lane: _Lane) -> None:
        """Forget an idle lane (nothing queued or computing)."""
        if not lane.busy and not lane.queue and self._lanes.get(token) is lane:
            del self._lanes[token]

    async def _run_batch(self, lane: _Lane) -> None:
        lane.busy = True
        batch: list[_Request] = []
        try:
            await lane.pace.cadence.hold(min(MAX_HOLD, lane.pace.last_pass_s),
                                         lambda: {id(r.sampler) for r in lane.queue})
            batch = [lane.queue.popleft() for _ in range(min(len(lane.queue), self.max_rows))]
            t0, started = time.perf_counter(), trio.current_time()
            # a thread of its own (limiter): never queued behind other to_thread work of the process;
            # not abandoned on cancel, so every request of the batch gets its answer
            await trio.to_thread.run_sync(self._compute, batch, limiter=lane.limiter)
        finally:
            lane.busy = False
            for r in batch:
                r.finished = True
            lane.wake()
            if batch:
                lane.pace.last_pass_s = trio.current_time() - started
                self.batch_rows[len(batch)] += 1
                for observe in self.observers:
                    observe(len(batch), time.perf_counter() - t0)

    def _compute(self, batch: list[_Request]) -> None:
        """In the compute thread: one head pass, each row's own sampler, one embedding call."""
        import torch

        try:
            with torch.inference_mode():
                logits = self.head.logits_rows([r.row for r in batch])
                n = len(batch)
                for r, row in zip(batch, logits):
                    try:
                        r.result = _pick_row(row, r, n)
                    except Exception as exc:     # this session's sampler failed: only its request fails
                        r.error = exc
                todo = [r for r in batch if r.result is not None and r.embed]
                if todo:
                    emb = self.head.embed(torch.tensor([[r.result.token] for r in todo if r.result is not None]))
                    for r, e in zip(todo, emb):
                        assert r.result is not None
                        r.result.hidden = e.unsqueeze(0).clone()   # [1, 1, hidden], owning its memory
        except Exception as exc:
            log.debug("head pass over %d rows failed: %s", len(batch), exc)
            for r in batch:
                if r.error is None:
                    r.error, r.result = exc, None


def _pick_row(logits: "torch.Tensor", r: _Request, rows: int) -> Pick:
    import torch

    pick = Pick(int(r.sampler.sample(logits, r.history)), rows=rows)
    if r.top_logprobs is not None:
        logp = torch.log_softmax(logits.float().reshape(-1), dim=-1)
        pick.logprob = float(logp[pick.token])
        if r.top_logprobs:
            vals, idx = torch.topk(logp, r.top_logprobs)
            pick.top = [(int(i), float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
    return pick
