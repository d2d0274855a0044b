"""The client looks up checkers for a route's unchecked hops while the step it just sent
computes (the first step through such a hop is checked before its result is used, so the
lookup used to be added to the prompt's step, the time to the first token); one lookup per
span at a time, shared by whoever needs it. On trio's virtual clock, with a fake lookup."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

import pymesh.client.verify as verify_mod
from pymesh.client.routing import SpanOption
from pymesh.client.verify import Verifier
from pymesh.proto.identity import Identity

LOOKUP_S = 0.05


def _verifier(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[int, int]]) -> tuple[Verifier, Any]:
    async def lookup(swarm: Any, start: int, stop: int, exclude: Any, min_cache_tokens: int,
                     model: str | None = None) -> None:
        calls.append((start, stop))
        await trio.sleep(LOOKUP_S)
        return None          # nobody else serves the span

    monkeypatch.setattr(verify_mod, "alternative_route", lookup)
    swarm = SimpleNamespace(settings=SimpleNamespace(client=SimpleNamespace(verify="sample", verify_rate=0.05)),
                            tasks=None, checked=set(), model_id="m@abc", current_bans=lambda: set())
    session = SimpleNamespace(swarm=swarm, max_tokens=64, batch=1, step_timeout=5.0)
    return Verifier(session), swarm  # type: ignore[arg-type]


def _route() -> list[SpanOption]:
    return [SpanOption(Identity.from_seed(bytes([i + 1]) * 32).peer_id, 2 * i, 2 * i + 2, "127.0.0.1", 9000 + i)
            for i in range(3)]


@pytest.mark.parametrize("computes, waits", [(0.1, 0.0), (LOOKUP_S / 5, LOOKUP_S * 4 / 5)],
                         ids=["answers-in-before-the-result", "result-first-shares-the-lookup"])
def test_checkers_are_looked_up_while_the_step_computes(monkeypatch: pytest.MonkeyPatch, computes: float,
                                                        waits: float) -> None:
    """The lookups start when the step is sent; a check before use finds their answer, or
    waits for the lookup in progress instead of starting another."""
    calls: list[tuple[int, int]] = []
    v, swarm = _verifier(monkeypatch, calls)
    route = _route()
    waited: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            swarm.tasks = nursery
            v.prefetch(route)                 # the step was just sent
            await trio.sleep(computes)        # it computes
            t0 = trio.current_time()
            for o in route:                   # the checks before use
                assert await v._shadow(o) is None
            waited.append(trio.current_time() - t0)
            v.prefetch(route)                 # no checker: not looked up again for a while
            swarm.tasks = None

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert waited == [pytest.approx(waits)]
    assert sorted(calls) == [(0, 2), (2, 4), (4, 6)], "one lookup per span"
