"""Continuous batching on a worker: steps of sessions that are ready together run as one forward,
and each session gets the numbers of its solo run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import trio
import trio.testing

from pymesh.model.span import load_span
from pymesh.worker.runtime import Runtime
from tests.model.tiny import make_tiny_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("batcher"), "llama")


def _x(seed: int, seq: int, size: int) -> torch.Tensor:
    return torch.randn(1, seq, size, generator=torch.Generator().manual_seed(seed))


def _plans() -> dict[int, list[int]]:
    """Per session: its steps' lengths (a prefill, then decode steps; different lengths)."""
    return {0: [6, 1, 1, 1, 1, 1, 1], 1: [11, 1, 1, 1], 2: [1, 1, 1, 1, 1], 3: [3, 1, 1, 1, 1, 1, 1, 1]}


def _solo(rt: Runtime, plans: dict[int, list[int]]) -> dict[int, list[torch.Tensor]]:
    h = rt.span.config.hidden_size  # type: ignore[union-attr]
    out = {}
    for sid, steps in plans.items():
        cache, pos, ys = rt.new_cache(64, 1), 0, []
        for j, s in enumerate(steps):
            ys.append(rt.forward(_x(100 * sid + j, s, h), cache, pos))
            pos += s
        out[sid] = ys
    return out


def _concurrent(rt: Runtime, plans: dict[int, list[int]], *, delays: dict[int, float] | None = None,
                priorities: dict[int, int] | None = None) -> tuple[dict[int, list[torch.Tensor]], list[int]]:
    """Every session stepping from its own task at once; returns outputs and each forward's rows."""
    h = rt.span.config.hidden_size  # type: ignore[union-attr]
    out: dict[int, list[torch.Tensor]] = {}
    rows: list[int] = []

    async def session(sid: int) -> None:
        await trio.sleep((delays or {}).get(sid, 0.0))
        cache, pos, ys = rt.new_cache(64, 1), 0, []
        for j, s in enumerate(plans[sid]):
            ys.append(await rt.batcher.step(_x(100 * sid + j, s, h), cache, pos, observe=rows.append,
                                            priority=(priorities or {}).get(sid, 0)))
            pos += s
        out[sid] = ys

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for sid in plans:
                nursery.start_soon(session, sid)

    trio.run(main)
    return out, rows


def _assert_same(got: dict[int, list[torch.Tensor]], want: dict[int, list[torch.Tensor]]) -> None:
    for sid, ys in want.items():
        assert len(got[sid]) == len(ys)
        for j, (a, b) in enumerate(zip(got[sid], ys)):
            assert a.shape == b.shape and a.dtype == b.dtype, (sid, j)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"session {sid} step {j}")


def test_sessions_stepping_together_share_forwards_and_keep_their_numbers(folder: Path) -> None:
    rt = Runtime(load_span(folder, 0, 2))
    plans = _plans()
    want = _solo(rt, plans)
    # sessions join at different times and leave after different numbers of steps
    got, rows = _concurrent(rt, plans, delays={2: 0.05, 3: 0.1})
    _assert_same(got, want)
    steps = sum(len(v) for v in plans.values())
    assert len(rows) < steps, f"{len(rows)} forwards for {steps} steps: nothing was batched"
    assert max(rows) > 1 and len(set(rows)) > 2, f"batch sizes should vary step to step: {rows}"
    assert sum(rows) == sum(sum(v) for v in plans.values()), "every row computed exactly once"
    assert rt.batcher.forwards == len(rows)


def test_long_prompt_is_chunked_beside_decode_rows(folder: Path) -> None:
    rt = Runtime(load_span(folder, 0, 2))
    rt.batcher.configure(enabled=True, max_tokens=4)
    plans = {0: [1] * 12, 1: [1] * 12, 2: [13, 1, 1]}
    want = _solo(rt, plans)
    got, rows = _concurrent(rt, plans)
    _assert_same(got, want)
    assert sum(rows) == sum(sum(v) for v in plans.values())
    # the 13-token prompt came with the others' decode steps: cut into chunks beside them,
    # no forward over the budget of 4 rows
    assert max(rows) <= 4, rows


def test_no_batching_runs_every_step_alone(folder: Path) -> None:
    rt = Runtime(load_span(folder, 0, 2))
    rt.batcher.configure(enabled=False, max_tokens=256)
    plans = {0: [5, 1, 1], 1: [2, 1, 1, 1]}
    want = _solo(rt, plans)
    got, rows = _concurrent(rt, plans)
    _assert_same(got, want)
    assert rows == [5, 1, 1, 2, 1, 1, 1] or sorted(rows) == sorted([5, 1, 1, 2, 1, 1, 1])
    assert len(rows) == 7


def test_a_lone_session_takes_the_unbatched_path(folder: Path) -> None:
    """Alone, a step runs exactly as without batching (the decode fast plan): bit-identical."""
    rt = Runtime(load_span(folder, 0, 2))
    plans = {0: [4, 1, 1, 1]}
    want = _solo(rt, plans)
    got, rows = _concurrent(rt, plans)
    for a, b in zip(got[0], want[0]):
        assert torch.equal(a, b)
    assert rows == [4, 1, 1, 1]


def test_a_failing_step_fails_alone(folder: Path) -> None:
    """A step that cannot run (positions past its cache) gets its error; the steps batched
    with it still get their results."""
    rt = Runtime(load_span(folder, 0, 1))
    h = rt.span.config.hidden_size  # type: ignore[union-attr]
    results: dict[str, object] = {}

    async def good(name: str, seed: int) -> None:
        cache = rt.new_cache(16, 1)
        results[name] = await rt.batcher.step(_x(seed, 1, h), cache, 0)

    async def bad() -> None:
        cache = rt.new_cache(4, 1)
        try:
            await rt.batcher.step(_x(9, 3, h), cache, 3)
        except Exception as exc:  # noqa: BLE001
            results["bad"] = exc

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(good, "a", 1)
            nursery.start_soon(bad)
            nursery.start_soon(good, "b", 2)
            nursery.start_soon(good, "c", 3)

    trio.run(main)
    assert "do not fit" in str(results["bad"])
    for name in "abc":
        assert isinstance(results[name], torch.Tensor)


def test_order_priority_then_arrival_and_decode_first(folder: Path) -> None:
    from pymesh.worker.batcher import _Job

    rt = Runtime(load_span(folder, 0, 1))
    rt.batcher.configure(enabled=True, max_tokens=4)
    h = rt.span.config.hidden_size  # type: ignore[union-attr]
    jobs = [_Job(_x(i, seq, h), rt.new_cache(16, 1), 0, prio, i)   # type: ignore[arg-type]
            for i, (seq, prio) in enumerate(((3, 0), (1, 0), (3, 5), (1, 0), (1, 0)))]
    rt.batcher._pending.extend(jobs)
    first = [(jobs.index(j), n) for j, n in rt.batcher._take()]
    # decode rows first (in arrival order), then the priority prompt gets the budget left
    assert first == [(1, 1), (3, 1), (4, 1), (2, 1)]
    rt.batcher._pending[:] = [jobs[0], jobs[2]]
    assert [(jobs.index(j), n) for j, n in rt.batcher._take()] == [(2, 3), (0, 1)]


def test_a_check_run_during_compute_fails_only_its_step(folder: Path) -> None:
    """Each step's ``during`` check runs on the event loop while the batch computes; one that
    raises fails its own step (output dropped), the others batched with it get theirs."""
    import threading

    rt = Runtime(load_span(folder, 0, 1))
    h = rt.span.config.hidden_size  # type: ignore[union-attr]
    ran: list[tuple[str, int]] = []
    results: dict[str, object] = {}

    def check(name: str, ok: bool) -> object:
        def fn() -> None:
            ran.append((name, threading.get_ident()))
            if not ok:
                raise ValueError(f"{name}: the receipt does not match")
        return fn

    async def one(name: str, seed: int, ok: bool) -> None:
        try:
            results[name] = await rt.batcher.step(_x(seed, 1, h), rt.new_cache(8, 1), 0,
                                                  during=check(name, ok))  # type: ignore[arg-type]
        except ValueError as exc:
            results[name] = exc

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for name, ok in (("a", True), ("b", False), ("c", True)):
                nursery.start_soon(one, name, ord(name), ok)

    trio.run(main)
    assert sorted(n for n, _ in ran) == ["a", "b", "c"], "every check runs once"
    assert {t for _, t in ran} == {threading.get_ident()}, "checks run on the event loop's thread"
    assert isinstance(results["b"], ValueError) and "does not match" in str(results["b"])
    assert isinstance(results["a"], torch.Tensor) and isinstance(results["c"], torch.Tensor)


def test_every_step_of_a_forward_resumes_in_the_same_round(folder: Path) -> None:
    """When a batched forward ends, all its steps' tasks resume together: each one's first
    action after the step (pushing its output on, in a worker) comes before any of them
    yields again (its copy to the client), instead of one task a scheduler round."""
    rt = Runtime(load_span(folder, 0, 2))
    h = rt.span.config.hidden_size  # type: ignore[union-attr]
    log: list[tuple[str, int]] = []
    rows: list[int] = []

    async def main() -> None:
        caches = [rt.new_cache(16, 1) for _ in range(5)]

        async def session(i: int, during: "Callable[[], object] | None" = None) -> None:
            await rt.batcher.step(_x(i, 1, h), caches[i], 0, observe=rows.append, during=during)
            log.append(("pushed", i))
            await trio.lowlevel.checkpoint()
            log.append(("copied", i))

        async with trio.open_nursery() as nursery:
            def others_arrive() -> None:  # runs on the event loop while session 0's forward computes
                for i in range(1, 5):
                    nursery.start_soon(session, i)

            nursery.start_soon(session, 0, others_arrive)

    trio.run(main)
    assert rows[-1] == 4, f"sessions 1-4 shared the second forward: {rows}"
    late = [kind for kind, i in log if i > 0]
    assert late == ["pushed"] * 4 + ["copied"] * 4, log


def test_hold_waits_only_for_steps_that_are_due() -> None:
    """Before a forward the device waits (bounded) for sessions whose next step is due within
    the wait, so sessions out of step merge into one batch; a lone session, a session that
    went quiet and one due later than the wait are not waited for."""
    from types import SimpleNamespace

    from pymesh.worker import batcher as bm

    b = bm.StepBatcher(SimpleNamespace())  # type: ignore[arg-type]
    b._last_forward_s = 1.0                 # the wait is capped by MAX_HOLD
    mine, due, late, quiet = object(), object(), object(), object()

    async def main() -> dict[str, float]:
        out = {}
        now = trio.current_time()
        b._pending = [SimpleNamespace(cache=mine)]  # type: ignore[list-item]
        b.cadence.beats = {id(mine): (now, 0.1)}
        t0 = trio.current_time()
        await b._hold()
        out["alone"] = trio.current_time() - t0
        # `due` stepped 0.09 s ago every 0.1 s: due in 0.01 s; `late` is due in 0.09 s (> MAX_HOLD);
        # `quiet` missed two of its beats
        b.cadence.beats.update({id(due): (now - 0.09, 0.1), id(late): (now - 0.01, 0.1), id(quiet): (now - 0.5, 0.1)})
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            async def arrive() -> None:
                await trio.sleep(0.01)
                b._pending.append(SimpleNamespace(cache=due))  # type: ignore[arg-type]
                b.cadence.note(id(due))
            nursery.start_soon(arrive)
            await b._hold()
            out["due arrives"] = trio.current_time() - t0
        b._pending = [SimpleNamespace(cache=mine)]  # type: ignore[list-item]
        b.cadence.beats[id(due)] = (trio.current_time() - 0.09, 0.1)  # due again, but never comes
        t0 = trio.current_time()
        await b._hold()
        out["due never comes"] = trio.current_time() - t0
        return out

    got = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert got["alone"] == 0.0
    assert got["due arrives"] == pytest.approx(0.01)
    assert got["due never comes"] == pytest.approx(bm.MAX_HOLD)
