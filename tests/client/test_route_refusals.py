"""Refusals that retrying cannot cure, on trio's virtual clock with simulated workers:

- a worker whose allowlist does not list this client (``not_listed``) is never asked again;
  when no route is left the client fails at once, saying so (peer id, --identity hint),
  instead of retrying until its discovery deadline ("banned after failures");
- a hop that does not know its successor (``next_unknown``, e.g. allowlists that differ
  between workers) rules out that (hop, successor) pair, not the successor everywhere.
"""

from __future__ import annotations

import pytest
import trio

from pymesh.client.routing import NoRouteError
from pymesh.client.session import InferenceSession
from pymesh.proto import session_wire as sw
from tests.client.sim import SimSwarm, SimWorker, peer, settings
from tests.hostile.test_client_faults import chain, run_session, virtual

pytestmark = pytest.mark.timeout(60)


def test_a_client_no_worker_lists_fails_at_once_naming_itself() -> None:
    async def main() -> None:
        workers = chain()
        workers[2].refuse = sw.ErrorCode.NOT_LISTED
        swarm = SimSwarm(workers, settings=settings(discovery_timeout=20.0))
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            swarm.nursery = nursery
            with pytest.raises(NoRouteError) as info:
                async with InferenceSession(swarm, 0, 6, max_tokens=4):
                    pass
            nursery.cancel_scope.cancel()
        took = trio.current_time() - t0
        msg = str(info.value)
        assert "allowlist" in msg and str(swarm.identity.peer_id) in msg and "--identity" in msg, msg
        assert took < 5, f"gave up after {took:.1f} virtual s, not at once"
        assert len(swarm.opened(3)) == 1               # never asked again

    virtual(main)


def test_a_worker_that_does_not_list_us_is_skipped_for_another() -> None:
    async def main() -> None:
        workers = chain(SimWorker(4, 4, 6))
        workers[2].refuse = sw.ErrorCode.NOT_LISTED
        swarm = SimSwarm(workers, settings=settings())
        session, _ = await run_session(swarm, 3)
        assert session.route[-1].peer == peer(4)
        assert len(swarm.opened(3)) <= 1 and peer(3) in swarm.not_listing
        assert peer(3) not in swarm.banned

    virtual(main)


def test_next_unknown_at_open_avoids_the_pair_and_bans_nobody() -> None:
    """W2 has no record it trusts of W3 (say W3 is not on W2's allowlist): the route goes
    W1 -> W2 -> W4 instead, and W3 stays usable on routes where W2 does not precede it."""
    async def main() -> None:
        workers = chain(SimWorker(4, 4, 6))
        workers[1].unknown_next = {peer(3)}
        swarm = SimSwarm(workers, settings=settings())
        session, _ = await run_session(swarm, 2)
        assert [o.peer for o in session.route] == [peer(1), peer(2), peer(4)]
        assert not swarm.banned and not swarm.bans.penalised(), swarm.banned
        assert swarm.bans.avoided_pairs() == {(peer(2), peer(3))}

    virtual(main)


def test_next_unknown_reported_mid_session_moves_the_successor_not_bans_it() -> None:
    async def main() -> None:
        swarm = SimSwarm(chain(SimWorker(4, 4, 6)), settings=settings())

        def before(k: int, s: InferenceSession) -> None:
            if k == 1:
                assert s.route[-1].peer == peer(3)
                swarm.workers[peer(2)].unknown_next = {peer(3)}

        session, took = await run_session(swarm, 3, before=before)
        assert [o.peer for o in session.route] == [peer(1), peer(2), peer(4)]
        assert not swarm.banned and not swarm.bans.penalised()
        assert [r["verdict"] for r in session.recoveries] == ["pair"]
        assert took[1] < 10

    virtual(main)


def test_with_no_other_route_the_pair_is_retried_and_the_failure_names_it() -> None:
    async def main() -> None:
        from pymesh.client.session import SessionFailed

        workers = chain()
        workers[1].unknown_next = {peer(3)}
        swarm = SimSwarm(workers, settings=settings())
        async with trio.open_nursery() as nursery:
            swarm.nursery = nursery
            with pytest.raises(SessionFailed, match="does not know") as info:
                async with InferenceSession(swarm, 0, 6, max_tokens=4):
                    pass
            nursery.cancel_scope.cancel()
        assert not swarm.banned, info.value

    virtual(main)
