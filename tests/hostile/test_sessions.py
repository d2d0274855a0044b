"""Hostile peers against a worker's sessions (issue 11, items 4 and 5), in-process.

Echo workers over memory streams under trio's virtual clock (tests/worker/harness.py):
- a stranger who knows a session id pushes steps ("retries" that overwrite KV positions
  downstream) and reads the session's counters;
- a forwarding loop W1 -> W2 -> W1 (a stale record lets W2 name W1 as its next hop) is fed
  one step and the attacker disconnects;
- a flood of future steps for one session (each would wait, holding its tensor).

Each ``measure_*`` returns the figure of the benchmark row; ``python -m tests.hostile.test_sessions``
prints the rows for the code in this tree (run it in a checkout of the commit before the
fixes for the "before" column).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from pymesh.proto import session_wire as wire
from pymesh.proto.session_wire import NextHop
from tests.worker.harness import Directory, MemNet, blob, open_meta, run, set_next_meta, step

pytestmark = pytest.mark.timeout(120)
SID = b"h" * 16


async def _two_hops(net: MemNet, directory: Directory) -> tuple[Any, Any, Any, Any]:
    w1 = await net.worker(0, 2, directory)
    w2 = await net.worker(2, 4, directory)
    client, inbox = await net.client()
    c1, c2 = await net.connect(client, w1.peer), await net.connect(client, w2.peer)
    await c2.call(wire.OPEN, open_meta(SID, 64, prev=w1.peer))
    await c1.call(wire.OPEN, open_meta(SID, 64, next_hop=NextHop(w2.peer, 2, 4)))
    return w1, w2, client, inbox


def measure_stranger() -> dict[str, int]:
    """A stranger pushes 5 "retries" of step 0 to the second hop and asks for the session's
    counters: steps it got computed, whether the counters answered, errors the client got."""
    out: dict[str, int] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w1, w2, client, inbox = await _two_hops(net, directory)
            await (await net.connect(client, w1.peer)).push(wire.STEP, step(SID, 0, 0), [blob(1.0)])
            await inbox.wait(1)
            await trio.sleep(1)
            before = w2.counters["steps"]
            mallory, _ = await net.client()
            m2 = await net.connect(mallory, w2.peer)
            for _ in range(5):
                await m2.push(wire.STEP, step(SID, 0, 0), [blob(666.0)])
            await trio.sleep(5)
            stats, _ = await m2.call(wire.STATS, wire.Stats(SID).to_meta())
            out["stranger_steps_computed"] = w2.counters["steps"] - before
            out["stranger_read_session_counters"] = int("s_steps" in stats)
            out["client_errors"] = len([t for t, _, _ in inbox.items if t == wire.ERR])
            nursery.cancel_scope.cancel()

    run(main)
    return out


def measure_loop(window: float = 120.0) -> dict[str, int]:
    """Steps computed within ``window`` virtual seconds by a W1 <-> W2 loop fed one step."""
    out: dict[str, int] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w1 = await net.worker(0, 2, directory)
            w2 = await net.worker(2, 4, directory, delay=0.5)
            # A stale record: w1 once served 4-6, so w2 may name it as the hop after its blocks.
            directory.entries[w1.peer] = (4, 6, directory.entries[w1.peer][2])
            attacker, _ = await net.client()
            a1, a2 = await net.connect(attacker, w1.peer), await net.connect(attacker, w2.peer)
            await a2.call(wire.OPEN, open_meta(SID, 64, copies=64, next_hop=NextHop(w1.peer, 4, 6), prev=w1.peer))
            await a1.call(wire.OPEN, open_meta(SID, 64, copies=64, next_hop=NextHop(w2.peer, 2, 4)))
            await a1.push(wire.STEP, step(SID, 0, 0), [blob(1.0)])
            await trio.sleep(0.2)               # the step is at w2 now: close the loop behind it
            await a1.call(wire.SET_NEXT, set_next_meta(SID, NextHop(w2.peer, 2, 4), prev=w2.peer))
            await a1.aclose()
            await a2.aclose()
            await trio.sleep(window)
            out["loop_steps_computed"] = w1.counters["steps"] + w2.counters["steps"]
            nursery.cancel_scope.cancel()

    run(main)
    return out


def measure_future_flood(n: int = 50) -> dict[str, int]:
    """``n`` future steps pushed for one session whose step 0 never comes: how many were held
    waiting (each with its tensor) rather than refused at once."""
    out: dict[str, int] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w1 = await net.worker(0, 2, directory)
            client, inbox = await net.client()
            c1 = await net.connect(client, w1.peer)
            await c1.call(wire.OPEN, open_meta(SID, 512))
            for k in range(1, n + 1):
                await c1.push(wire.STEP, step(SID, k, k), [blob(1.0)])
            await trio.sleep(1)                 # well before step_wait (10 s)
            out["future_steps_held"] = n - len(inbox.errors())
            await trio.sleep(w1.settings.step_wait + 5)
            out["errors_in_the_end"] = len(inbox.errors())
            nursery.cancel_scope.cancel()

    run(main)
    return out


def test_a_stranger_cannot_push_steps_or_read_a_sessions_counters() -> None:
    m = measure_stranger()
    assert m == {"stranger_steps_computed": 0, "stranger_read_session_counters": 0, "client_errors": 0}


def test_a_forwarding_loop_computes_a_bounded_number_of_steps() -> None:
    from pymesh.worker.sessions import MAX_RETRIES

    m = measure_loop()
    assert m["loop_steps_computed"] <= 2 * (MAX_RETRIES + 1)


def test_future_steps_per_session_are_bounded() -> None:
    from pymesh.worker.datapath import MAX_WAITING

    m = measure_future_flood()
    assert m["future_steps_held"] <= MAX_WAITING and m["errors_in_the_end"] == 50


if __name__ == "__main__":
    for name, fn in (("stranger", measure_stranger), ("loop", measure_loop), ("future flood", measure_future_flood)):
        print(name, fn())
