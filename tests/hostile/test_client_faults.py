"""The client under faults and hostile peers (issue 11, items 1, 4 and 9), in process on
trio's virtual clock: simulated echo workers (tests/client/sim.py) behind the production
Swarm and InferenceSession.

- a failed hop-to-hop link (reported, or found by the stall probe's link check) relinks
  the hop and bans nobody;
- a restarted worker (session lost, its predecessor's link stale) is reopened and replayed
  and the route resumes within a few probe periods, far below the step timeout;
- a ``pm.err`` from a peer off the route, or blaming a hop that is not the sender's
  successor, is dropped; a wrong-shaped, wrong-dtype or non-finite output bans its sender
  (never lifted by a newer record) instead of reaching the caller.

``python -m tests.hostile.test_client_faults`` prints the measured rows.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import pytest
import torch
import trio
import trio.testing

from pymesh.client.bans import BanCause
from pymesh.client.session import InferenceSession
from pymesh.proto import session_wire as sw
from tests.client.sim import SimSwarm, SimWorker, peer, record, settings

pytestmark = pytest.mark.timeout(60)

STEP_TIMEOUT = 60.0


def virtual(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def x(k: int) -> torch.Tensor:
    return torch.randn(1, 2 if k == 0 else 1, 4, generator=torch.Generator().manual_seed(k))


def chain(*extra: SimWorker) -> list[SimWorker]:
    return [SimWorker(1, 0, 2), SimWorker(2, 2, 4), SimWorker(3, 4, 6), *extra]


async def run_session(swarm: SimSwarm, steps: int, *, before: Callable[[int, InferenceSession], None] | None = None,
                      ) -> tuple[InferenceSession, dict[int, float]]:
    """Run ``steps`` echo steps; returns the session and the virtual seconds each step took."""
    took: dict[int, float] = {}
    async with trio.open_nursery() as nursery:
        swarm.nursery = nursery
        async with InferenceSession(swarm, 0, 6, max_tokens=steps + 2) as session:
            for k in range(steps):
                if before is not None:
                    before(k, session)
                t0 = trio.current_time()
                y = await session.step(x(k))
                took[k] = trio.current_time() - t0
                assert torch.equal(y, x(k)), f"step {k}: echo output differs"
        nursery.cancel_scope.cancel()
    return session, took


def test_open_and_relink_name_the_previous_hop() -> None:
    async def main() -> None:
        swarm = SimSwarm(chain(), settings=settings())
        await run_session(swarm, 1)
        assert [o.prev for o in swarm.opened(1)] == [None]
        assert [o.prev for o in swarm.opened(2)] == [peer(1)]
        assert [o.prev for o in swarm.opened(3)] == [peer(2)]

    virtual(main)


def test_reported_link_failure_relinks_and_bans_nobody() -> None:
    async def main() -> None:
        swarm = SimSwarm(chain(), settings=settings())

        def before(k: int, s: InferenceSession) -> None:
            if k == 3:
                swarm.workers[peer(1)].broken = "report"   # worker 1's connection to 2 was reset

        session, took = await run_session(swarm, 6, before=before)
        assert swarm.banned == {}, "a link failure must not ban the peer behind it"
        assert [o.peer for o in session.route] == [peer(1), peer(2), peer(3)]
        assert [r["verdict"] for r in session.recoveries] == ["link"]
        relinks = swarm.calls_of(sw.SetNext, 1)
        assert relinks and relinks[-1].next_hop is not None and relinks[-1].next_hop.peer == peer(2)
        assert swarm.calls_of(sw.Forward) == []          # worker 2 kept its cache: nothing replayed
        assert took[3] < STEP_TIMEOUT / 10

    virtual(main)


def test_stall_probe_finds_a_dead_link_well_before_the_step_timeout() -> None:
    async def main() -> None:
        swarm = SimSwarm(chain(), settings=settings())

        def before(k: int, s: InferenceSession) -> None:
            if k == 2:
                swarm.workers[peer(2)].broken = "vanish"   # pushes from 2 to 3 disappear silently

        session, took = await run_session(swarm, 4, before=before)
        assert swarm.banned == {}
        assert took[2] < STEP_TIMEOUT / 5, took      # probe_after + one probe round, not 60 s
        assert swarm.calls_of(sw.CheckLink, 2), "the stall probe checks the route's links"
        assert [r["verdict"] for r in session.recoveries] == ["link"]

    virtual(main)


def test_failed_link_to_a_successor_silent_to_us_too_bans_it_and_uses_the_spare() -> None:
    async def main() -> None:
        swarm = SimSwarm(chain(SimWorker(5, 2, 4)), settings=settings())

        def before(k: int, s: InferenceSession) -> None:
            if k == 2:
                swarm.workers[peer(1)].broken = "report"
                swarm.workers[s.route[1].peer].down = True     # stopped, not restarted

        session, took = await run_session(swarm, 4, before=before)
        stopped = ({peer(2), peer(5)} - {session.route[1].peer}).pop()
        assert swarm.bans.active()[stopped].cause is BanCause.TIMEOUT        # lifted by a new incarnation
        assert [r["verdict"] for r in session.recoveries] == ["ban"]
        assert "stopped answering" in session.recoveries[0]["why"]
        assert took[2] < STEP_TIMEOUT / 5

    virtual(main)


def restart_resume_seconds(mode: str) -> tuple[float, InferenceSession, SimSwarm, dict[Any, float]]:
    """Worker 2 restarts before step 4 (same identity, sessions lost); ``mode``: how worker
    1's stale link behaves ("vanish": silent, "report": reset at the first packet)."""
    out: dict[str, Any] = {}

    async def main() -> None:
        swarm = SimSwarm(chain(), settings=settings())

        def before(k: int, s: InferenceSession) -> None:
            if k == 4:
                swarm.restart(2, at=2000.0)
                swarm.workers[peer(1)].broken = mode

        session, took = await run_session(swarm, 6, before=before)
        out.update(seconds=took[4], session=session, swarm=swarm, banned=dict(swarm.banned))

    virtual(main)
    return out["seconds"], out["session"], out["swarm"], out["banned"]


@pytest.mark.parametrize("mode", ["vanish", "report"])
def test_restarted_worker_is_reopened_and_replayed_not_banned(mode: str) -> None:
    seconds, session, swarm, banned = restart_resume_seconds(mode)
    assert banned == {}
    assert [o.peer for o in session.route] == [peer(1), peer(2), peer(3)]
    assert len(swarm.opened(2)) == 2                   # opened again after the restart...
    assert swarm.opened(2)[-1].prev == peer(1)
    assert len(swarm.calls_of(sw.Forward, 2)) == 4     # ...and steps 0-3 replayed onto it
    assert seconds < STEP_TIMEOUT / 5


@pytest.mark.parametrize("bad", ["shape", "dtype", "nan"])
def test_wrong_last_hop_output_bans_it_for_a_wrong_answer_and_recovers(bad: str) -> None:
    wrong = {"shape": lambda t: t[..., :3], "dtype": lambda t: t.double(),
             "nan": lambda t: torch.full_like(t, float("nan"))}[bad]

    async def main() -> None:
        liar = SimWorker(3, 4, 6, compute=wrong)
        swarm = SimSwarm([SimWorker(1, 0, 2), SimWorker(2, 2, 4), liar, SimWorker(4, 4, 6)],
                         records=[record(1, 0, 2), record(2, 2, 4), record(3, 4, 6, block_ms=1.0),
                                  record(4, 4, 6, block_ms=50.0)], settings=settings())
        session, _ = await run_session(swarm, 3)
        assert session.route[-1].peer == peer(4)
        assert swarm.bans.active()[peer(3)].cause is BanCause.WRONG_ANSWER
        # a newer record of the liar (a restart, or just a heartbeat) does not lift that ban
        swarm.published = [r if r.peer_id != peer(3) else record(3, 4, 6, ts=5000.0) for r in swarm.published]
        await swarm.records()
        assert peer(3) in swarm.banned

    virtual(main)


def forged_err_bans() -> int:
    """Bans caused by pm.err pushes forged by a peer off the route (and by hops blaming a
    peer that is not their successor) during a 3-step session."""
    out: list[int] = []

    async def main() -> None:
        swarm = SimSwarm(chain(SimWorker(9, 0, 2)), settings=settings())
        sid: list[bytes] = []
        orig = swarm._deliver

        class Conn:
            def __init__(self, n: int) -> None:
                self.peer = peer(n)

        async def deliver(sender: Any, w: SimWorker, step: sw.Step, blob: Any) -> None:
            if w.n == 1:
                # worker 9 (off the route) blames 2; worker 1 blames 3 (not its successor);
                # worker 2 blames its predecessor 1
                for n, blame, start in ((9, 2, 0), (1, 3, 0), (2, 1, 2)):
                    err = sw.Err(sid[0], step.step, sw.ErrorCode.INTERNAL, "it was them", start, start + 2,
                                 blame=peer(blame))
                    await swarm._on_err(Conn(n), err.to_meta(), [])  # type: ignore[arg-type]
            await orig(sender, w, step, blob)

        def before(k: int, s: InferenceSession) -> None:
            sid[:] = [s.sid]

        swarm._deliver = deliver  # type: ignore[method-assign]
        session, _ = await run_session(swarm, 3, before=before)
        assert session.recoveries == []
        out.append(len(swarm.banned))

    virtual(main)
    return out[0]


def test_err_from_off_route_or_blaming_a_non_successor_is_dropped() -> None:
    assert forged_err_bans() == 0


def main() -> None:
    """Print the closing-table rows measured here (virtual seconds)."""
    for mode in ("vanish", "report"):
        seconds, session, swarm, banned = restart_resume_seconds(mode)
        print(f"restarted middle worker (stale link: {mode}) | before: step timeout (60 s), ban, give up | "
              f"after: reopened + replayed, {len(banned)} bans | {seconds:.2f} s (virtual) to resume")
    print(f"forged pm.err (off-route peer; hops blaming a non-successor) | before: the blamed honest hop banned | "
          f"after: dropped | {forged_err_bans()} bans")


if __name__ == "__main__":
    main()
