"""The client's batched LM head (pymesh/client/headbatch.py) on a tiny random model's head.

- rows computed together equal each row computed alone (the near-tie rule for the argmax);
- a lone request runs at once, alone; requests arriving while a pass computes form the next
  pass, in arrival order, at most ``max_rows`` a pass;
- sampling stays per session: greedy, seeded temperature sampling, repetition penalties and
  logprobs in one pass equal each session's solo result;
- a request cancelled while queued leaves the queue; a malformed row fails only its caller.

The compute thread is held on a gate (a threading.Event) where the order of arrivals matters,
so the batches these tests expect do not depend on timing.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import pytest
import torch
import trio
import trio.testing

from pymesh.client.headbatch import HeadBatcher, HeadQueueFull, Pick
from pymesh.model.head import ClientHead, load_head
from pymesh.model.sampling import Sampler, SamplingParams
from pymesh.model.shapes import ShapeError
from tests.model.tiny import make_tiny_model

pytestmark = pytest.mark.timeout(120)

NEAR_TIE = 1e-3


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> ClientHead:
    return load_head(make_tiny_model(tmp_path_factory.mktemp("headbatch"), "llama", num_hidden_layers=2,
                                     name="tinyhb"))


def rows(n: int, seed: int = 0, size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=g) for _ in range(n)]


def solo(head: ClientHead, row: torch.Tensor, params: SamplingParams, history: list[int],
         top: int | None = None) -> tuple[int, float | None, list[tuple[int, float]]]:
    """What the unbatched path computed: one row through the head, a fresh sampler."""
    with torch.inference_mode():
        logits = head.logits(row)
        token = Sampler(params).sample(logits, history)
        if top is None:
            return token, None, []
        logp = torch.log_softmax(logits, -1)
        vals, idx = torch.topk(logp, top)
        return token, float(logp[token]), [(int(i), float(v)) for v, i in zip(vals.tolist(), idx.tolist())]


class Gated(ClientHead):
    """The head with a gate the compute thread waits on, recording each pass's rows."""

    def __init__(self, head: ClientHead) -> None:
        super().__init__(head.config, head.embed_tokens, head.norm, head.lm_head, device=head.device, dtype=head.dtype)
        self.gate = threading.Event()
        self.gate.set()
        self.passes: list[list[float]] = []

    def logits_rows(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        self.passes.append([float(r[0]) for r in rows])
        assert self.gate.wait(30), "the test never opened the gate"
        return super().logits_rows(rows)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 16, 33, 64])
def test_rows_together_equal_rows_alone(head: ClientHead, n: int) -> None:
    xs = rows(n, seed=n)
    together = head.logits_rows(xs)
    assert together.shape == (n, head.config.vocab_size) and together.dtype == torch.float32
    for i, x in enumerate(xs):
        alone = head.logits(x)
        torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-4)
        if int(torch.argmax(together[i])) != int(torch.argmax(alone)):
            top = torch.topk(alone, 2).values
            gap = float(top[0] - top[1])
            assert gap < NEAR_TIE, f"row {i} of {n}: argmax differs and the solo top-2 gap {gap:.2e} is no near tie"


def test_logits_rows_rejects_malformed_rows(head: ClientHead) -> None:
    with pytest.raises(ShapeError, match=r"\[64\]"):
        head.logits_rows([torch.zeros(64), torch.zeros(1, 64)])
    with pytest.raises(ShapeError):
        head.logits_rows([])


def test_a_lone_request_runs_at_once_and_alone(head: ClientHead) -> None:
    batcher = HeadBatcher(head)
    x = rows(1)[0]
    params = SamplingParams()

    async def main() -> Pick:
        return await batcher.pick(x, Sampler(params), [5, 6])

    pick = trio.run(main)
    assert pick.token == solo(head, x, params, [5, 6])[0] and pick.rows == 1
    with torch.inference_mode():
        assert pick.hidden is not None and torch.equal(pick.hidden, head.embed(torch.tensor([[pick.token]])))
    assert dict(batcher.batch_rows) == {1: 1}


def test_a_pass_waits_for_a_session_that_is_due_but_not_for_one_that_went_quiet(head: ClientHead) -> None:
    """Sessions stepping together get their results one by one: the first request's pass
    waits (bounded) for a session whose next request is due, so both share one pass; a session
    that missed its beats is not waited for. On trio's virtual clock."""
    gated = Gated(head)
    batcher = HeadBatcher(gated)
    xs = rows(2, seed=7)
    params = SamplingParams()
    a, b = Sampler(params), Sampler(params)
    waited: dict[str, float] = {}

    async def main() -> None:
        pace = batcher._pace(trio.lowlevel.current_trio_token())
        for case, b_last, b_comes in (("due", 0.095, True), ("quiet", 0.5, False)):
            pace.last_pass_s = 1.0                       # the wait is capped by MAX_HOLD (20 ms)
            now = trio.current_time()
            # both step every 0.1 s; a's request comes now, b's ("due") 5 ms later
            pace.cadence.beats = {id(a): (now - 0.1, 0.1), id(b): (now - b_last, 0.1)}
            t0 = trio.current_time()
            async with trio.open_nursery() as nursery:
                async def first() -> None:
                    await batcher.pick(xs[0], a, [])
                    waited[case] = trio.current_time() - t0

                async def second() -> None:
                    await trio.sleep(0.005)
                    await batcher.pick(xs[1], b, [])

                nursery.start_soon(first)
                if b_comes:
                    nursery.start_soon(second)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [len(p) for p in gated.passes] == [2, 1], \
        "the due session shared the first pass; the quiet one was not waited for"
    assert waited["due"] == pytest.approx(0.005) and waited["quiet"] == 0.0


async def _queued(batcher: HeadBatcher, gated: Gated, xs: list[torch.Tensor], **kw: Any) -> dict[int, Pick]:
    """Request 0 starts a pass alone and is held in it; requests 1.. arrive meanwhile."""
    got: dict[int, Pick] = {}
    params = SamplingParams()

    async def one(i: int) -> None:
        got[i] = await batcher.pick(xs[i], Sampler(params), [], **kw)

    gated.gate.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, 0)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(1, len(xs)):
            nursery.start_soon(one, i)
            await trio.testing.wait_all_tasks_blocked()   # arrival order = i
        gated.gate.set()
    return got


def test_requests_arriving_during_a_pass_form_the_next_one_in_order(head: ClientHead) -> None:
    gated = Gated(head)
    batcher = HeadBatcher(gated)
    xs = rows(6, seed=1)
    got = trio.run(_queued, batcher, gated, xs)
    assert [len(p) for p in gated.passes] == [1, 5]
    assert gated.passes[1] == [float(x[0]) for x in xs[1:]], "the second pass is not in arrival order"
    assert dict(batcher.batch_rows) == {1: 1, 5: 1}
    assert [got[i].rows for i in range(6)] == [1, 5, 5, 5, 5, 5]
    for i, x in enumerate(xs):
        assert got[i].token == solo(head, x, SamplingParams(), [])[0]


def test_a_pass_takes_at_most_max_rows_first_come_first_served(head: ClientHead) -> None:
    gated = Gated(head)
    batcher = HeadBatcher(gated, max_rows=3)
    xs = rows(9, seed=2)
    trio.run(_queued, batcher, gated, xs)
    assert [len(p) for p in gated.passes] == [1, 3, 3, 2]
    assert [v for p in gated.passes for v in p] == [float(x[0]) for x in xs]


def test_sampling_stays_per_session_in_one_pass(head: ClientHead) -> None:
    """Greedy, seeded sampling (two sessions, same seed) and a repetition penalty side by side,
    logprobs for some: each equals its own solo run."""
    gated = Gated(head)
    batcher = HeadBatcher(gated)
    xs = rows(6, seed=3)
    xs[2] = xs[1].clone()           # sessions 1 and 2: same row, same seed, generators of their own
    specs: list[tuple[SamplingParams, list[int], int | None]] = [
        (SamplingParams(), [], None),
        (SamplingParams(temperature=0.9, top_k=50, seed=11), [], 3),
        (SamplingParams(temperature=0.9, top_k=50, seed=11), [], None),
        (SamplingParams(temperature=1.3, top_p=0.8, seed=12), [], 0),
        (SamplingParams(repetition_penalty=100.0), [], 2),
        (SamplingParams(), [], 5),
    ]
    with torch.inference_mode():   # the penalised session's history: its own greedy token
        specs[4] = (specs[4][0], [int(torch.argmax(head.logits(xs[4])))], 2)
    got: dict[int, Pick] = {}

    async def main() -> None:
        async def one(i: int) -> None:
            params, history, top = specs[i]
            got[i] = await batcher.pick(xs[i], Sampler(params), history, top_logprobs=top)

        gated.gate.clear()
        async with trio.open_nursery() as nursery:
            for i in range(len(xs)):
                nursery.start_soon(one, i)
                await trio.testing.wait_all_tasks_blocked()
            gated.gate.set()

    trio.run(main)
    assert dict(batcher.batch_rows) == {1: 1, 5: 1}
    for i, (params, history, top) in enumerate(specs):
        token, logprob, alts = solo(head, xs[i], params, history, top)
        assert got[i].token == token, f"session {i}: batched {got[i].token}, solo {token}"
        if top is None:
            assert got[i].logprob is None and got[i].top == []
        else:
            assert got[i].logprob == pytest.approx(logprob, abs=1e-4)
            assert [t for t, _ in got[i].top] == [t for t, _ in alts]
    assert got[1].token == got[2].token      # a shared generator would have drawn twice
    with torch.inference_mode():
        greedy4 = int(torch.argmax(head.logits(xs[4])))
    assert got[4].token != greedy4, "the repetition penalty was not applied to its own session"


def test_a_request_cancelled_while_queued_leaves_the_queue(head: ClientHead) -> None:
    gated = Gated(head)
    batcher = HeadBatcher(gated)
    xs = rows(4, seed=4)
    got: dict[int, Pick] = {}

    async def main() -> None:
        async def one(i: int, scope: trio.CancelScope | None = None) -> None:
            with scope if scope is not None else trio.CancelScope():
                got[i] = await batcher.pick(xs[i], Sampler(SamplingParams()), [])

        gated.gate.clear()
        cancel = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 0)
            await trio.testing.wait_all_tasks_blocked()
            for i in (1, 2, 3):
                nursery.start_soon(one, i, cancel if i == 2 else None)
                await trio.testing.wait_all_tasks_blocked()
            cancel.cancel()
            await trio.testing.wait_all_tasks_blocked()
            gated.gate.set()

    trio.run(main)
    assert sorted(got) == [0, 1, 3]
    assert gated.passes[1] == [float(xs[1][0]), float(xs[3][0])]
    assert batcher._lanes == {}, "an idle batcher keeps no lane"


def test_a_runner_cancelled_mid_pass_lets_the_others_finish(head: ClientHead) -> None:
    """Request 0 runs its pass and is cancelled in it: the pass is not abandoned (request 0
    still gets its answer; the cancellation lands at its next checkpoint) and the requests
    queued meanwhile run in the next pass, run by one of them."""
    gated = Gated(head)
    batcher = HeadBatcher(gated)
    xs = rows(4, seed=6)
    got: dict[int, Pick] = {}
    cancelled: list[int] = []

    async def main() -> None:
        async def one(i: int, scope: trio.CancelScope) -> None:
            with scope:
                got[i] = await batcher.pick(xs[i], Sampler(SamplingParams()), [])
            if scope.cancelled_caught:
                cancelled.append(i)

        gated.gate.clear()
        scopes = [trio.CancelScope() for _ in xs]
        async with trio.open_nursery() as nursery:
            for i in range(len(xs)):
                nursery.start_soon(one, i, scopes[i])
                await trio.testing.wait_all_tasks_blocked()
            scopes[0].cancel()
            await trio.testing.wait_all_tasks_blocked()
            gated.gate.set()

    trio.run(main)
    assert cancelled == [] and sorted(got) == [0, 1, 2, 3]
    assert [len(p) for p in gated.passes] == [1, 3]
    assert dict(batcher.batch_rows) == {1: 1, 3: 1} and batcher._lanes == {}


def test_a_malformed_row_fails_only_its_caller(head: ClientHead) -> None:
    batcher = HeadBatcher(head)

    async def main() -> None:
        with pytest.raises(ShapeError, match="one hidden row"):
            await batcher.pick(torch.zeros(1, 64), Sampler(SamplingParams()), [])
        pick = await batcher.pick(torch.zeros(64), Sampler(SamplingParams()), [])
        assert pick.rows == 1

    trio.run(main)


def test_a_request_beyond_max_queued_is_refused(head: ClientHead) -> None:
    gated = Gated(head)
    batcher = HeadBatcher(gated, max_queued=2)
    xs = rows(4, seed=5)

    async def main() -> None:
        async def one(i: int) -> None:
            await batcher.pick(xs[i], Sampler(SamplingParams()), [])

        gated.gate.clear()
        async with trio.open_nursery() as nursery:
            for i in range(3):            # 0 computes, 1 and 2 fill the queue
                nursery.start_soon(one, i)
                await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(HeadQueueFull, match="already waiting"):
                await batcher.pick(xs[3], Sampler(SamplingParams()), [])
            gated.gate.set()

    trio.run(main)
    assert [len(p) for p in gated.passes] == [1, 2]


def test_batcher_bounds_are_checked(head: ClientHead) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HeadBatcher(head, max_rows=0)
