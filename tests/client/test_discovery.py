"""Discovery under churn and restarts (issue 11, items 1, 9 and 10), on trio's virtual clock:
records kept across lookups while nodes join, a gap looked up on its own, bans lifted by a
new incarnation's record, waiting for the earliest ban, failed RTT probes remembered, and
the allowlist."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Awaitable, Callable, Sequence

import pytest
import trio
import trio.testing

from pymesh.client.bans import BanBook, BanCause
from pymesh.client.discovery import RecordBook
from pymesh.client.routing import NoRouteError, SpanOption
from pymesh.client.swarm import Swarm
from pymesh.errors import PeerUnavailable
from pymesh.proto.allowlist import PeerAllowlist
from pymesh.proto.records import WorkerRecord
from pymesh.proto.vocab import WorkerState
from tests.client.sim import BOOT, FakeDHT, peer, record, settings


def virtual(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


class ScriptedSwarm(Swarm):
    """DHT reads answer from ``script(read number, block)``; RTTs are not measured."""

    def __init__(self, script: Callable[[int, int | None], list[WorkerRecord]], **kw: Any) -> None:
        super().__init__(BOOT, "m", **kw)
        self.dht_reads = FakeDHT(lambda block: script(len(self.dht_reads.reads), block))
        self._dht = self.dht_reads  # type: ignore[assignment]

    @property
    def lookups(self) -> list[int | None]:
        return self.dht_reads.reads

    async def measure_rtts(self, options: Sequence[SpanOption]) -> None:
        return None


def test_records_of_several_lookups_are_merged_while_a_node_joins() -> None:
    # Four workers serve 0-2 / 2-4 / 4-6 / 6-8. A fifth node joins the DHT: from then on each
    # lookup's closest nodes include the newcomer that holds nothing yet, and every lookup
    # returns only part of the records (alternating halves). One lookup never sees a route.
    recs = [record(1, 0, 2), record(2, 2, 4), record(3, 4, 6), record(4, 6, 8)]

    def script(n: int, block: int | None) -> list[WorkerRecord]:
        if block is not None:
            return []                       # per-block reads land on the newcomer too
        wide = s.lookups.count(None)
        return recs[2:] if wide % 2 else recs[:2]

    async def main() -> None:
        route = await s.find_route(0, 8)
        assert [o.peer for o in route] == [peer(1), peer(2), peer(3), peer(4)]
        assert s.lookups.count(None) <= 3

    s = ScriptedSwarm(script, settings=settings(discovery_timeout=20.0))

    virtual(main)


def test_a_missing_layer_gets_a_lookup_of_its_own_before_it_is_declared_missing() -> None:
    # The model-wide read keeps missing layer 0's worker (its record sits on a node the
    # read did not page); a read for block 0 finds it.
    recs = [record(1, 0, 2), record(2, 2, 4)]

    def script(n: int, block: int | None) -> list[WorkerRecord]:
        return [r for r in recs if r.covers(block)] if block is not None else recs[1:]

    async def main() -> None:
        s = ScriptedSwarm(script, settings=settings(discovery_timeout=20.0))
        t0 = trio.current_time()
        route = await s.find_route(0, 4)
        assert [o.peer for o in route] == [peer(1), peer(2)]
        assert 0 in s.lookups and trio.current_time() - t0 < 5

    virtual(main)


def test_an_offline_record_replaces_the_online_one_in_the_union() -> None:
    book = RecordBook("m", lambda: 0.0, 300.0)
    book.merge([record(1, 0, 2, ts=10.0)])
    book.merge([record(1, 0, 2, ts=20.0, state=WorkerState.OFFLINE)])
    book.merge([record(1, 0, 2, ts=10.0)])              # a stale copy from a slow node
    assert book.live() == [] and len(book.all()) == 1


def test_records_no_lookup_returned_for_the_ttl_are_forgotten() -> None:
    now = [0.0]
    book = RecordBook("m", lambda: now[0], 300.0)
    book.merge([record(1, 0, 2)])
    now[0] = 299.0
    assert len(book.live()) == 1
    now[0] = 301.0
    assert book.live() == []


def test_a_newer_record_lifts_a_timeout_ban_but_not_a_wrong_answer_ban() -> None:
    bans = BanBook(lambda: 0.0, 60.0)
    bans.see([record(1, 0, 2, ts=100.0), record(2, 0, 2, ts=100.0)])
    bans.ban(peer(1), "silent", BanCause.TIMEOUT)
    bans.ban(peer(2), "NaN output", BanCause.WRONG_ANSWER)
    assert bans.see([record(1, 0, 2, ts=100.0)]) == []           # the same record: still banned
    lifted = bans.see([record(1, 0, 2, ts=101.0), record(2, 0, 2, ts=101.0)])
    assert [p for p, _ in lifted] == [peer(1)]
    assert set(bans.active()) == {peer(2)}
    # a liftable ban never weakens a wrong-answer one
    bans.ban(peer(2), "timeout", BanCause.TIMEOUT)
    assert bans.active()[peer(2)].cause is BanCause.WRONG_ANSWER


def ban_lift_seconds(announce_at: float = 3.0) -> float:
    """Worker 2 (the only one serving 2-4) was banned after a timeout; ``announce_at`` s later
    it restarts and publishes a newer record. Returns when the route came back (virtual s)."""
    old = [record(1, 0, 2), record(2, 2, 4, ts=1000.0)]
    new = [record(1, 0, 2), record(2, 2, 4, ts=1000.0 + announce_at)]
    out: list[float] = []

    async def main() -> None:
        t0 = trio.current_time()
        s = ScriptedSwarm(lambda n, b: new if trio.current_time() - t0 >= announce_at else old,
                          settings=settings(discovery_timeout=20.0, ban_seconds=60.0))
        await s.records()
        s.ban(peer(2), "no result within 60 s")
        route = await s.find_route(0, 4)
        assert [o.peer for o in route] == [peer(1), peer(2)] and s.banned == {}
        out.append(trio.current_time() - t0)

    virtual(main)
    return out[0]


def test_restarted_worker_announcing_itself_lifts_its_ban_during_discovery() -> None:
    # The route comes back within one retry of the new record, not after the 60 s ban (nor
    # a NoRouteError at the 20 s discovery deadline).
    assert 3 <= ban_lift_seconds(3.0) <= 5.5


def test_every_provider_banned_waits_for_the_earliest_ban_to_end() -> None:
    async def main() -> None:
        recs = [record(1, 0, 2), record(2, 0, 2), record(3, 2, 4)]
        s = ScriptedSwarm(lambda n, b: recs, settings=settings(discovery_timeout=20.0, ban_seconds=60.0))
        await s.records()
        s.ban(peer(1), "silent")
        await trio.sleep(10)
        s.ban(peer(2), "silent")
        t0 = trio.current_time()
        route = await s.find_route(0, 4)          # peer 1's ban ends at t0 + 50
        assert [o.peer for o in route] == [peer(1), peer(3)]
        assert trio.current_time() - t0 == pytest.approx(50, abs=0.5)

    virtual(main)


def test_a_gap_nobody_serves_still_gives_up_at_the_discovery_deadline() -> None:
    async def main() -> None:
        s = ScriptedSwarm(lambda n, b: [record(1, 0, 2)], settings=settings(discovery_timeout=20.0))
        t0 = trio.current_time()
        with pytest.raises(NoRouteError, match="no worker serves layer 2"):
            await s.find_route(0, 4)
        assert trio.current_time() - t0 <= 20

    virtual(main)


class DeadAddressSwarm(Swarm):
    """Real measure_rtts; worker 2's address never answers (each try costs rpc_timeout)."""

    def __init__(self, recs: list[WorkerRecord], **kw: Any) -> None:
        super().__init__(BOOT, "m", **kw)
        self.recs = recs
        self.dials: list[int] = []
        self._dht = FakeDHT(lambda block: list(self.recs))  # type: ignore[assignment]

    async def connect(self, option: SpanOption) -> Any:
        self.dials.append(option.peer.key[0])
        if option.peer == peer(2):
            await trio.sleep(self.rpc_timeout + 1)
            raise PeerUnavailable("no answer")

        class Conn:
            async def call(self, method: str, meta: Any) -> Any:
                return {}, []
        return Conn()


def dead_address_searches(searches: int = 3) -> tuple[int, float]:
    """Route searches after a first one met a dead address: (probes of it, virtual seconds)."""
    out: list[tuple[int, float]] = []

    async def main() -> None:
        recs = [record(1, 0, 2), record(2, 0, 2)]
        s = DeadAddressSwarm(recs, settings=settings(rpc_timeout=10.0, ban_seconds=1.0))
        await s.find_route(0, 2)
        assert s.dials.count(2) == 1
        await trio.sleep(5)                      # the ban ran out, the failure is remembered
        t0 = trio.current_time()
        for _ in range(searches):
            await s.find_route(0, 2)
        out.append((s.dials.count(2) - 1, trio.current_time() - t0))
        s.recs = [recs[0], replace(recs[1], timestamp=2000.0, port=2002)]   # a new record: probed again
        await s.find_route(0, 2)
        assert s.dials.count(2) == out[0][0] + 2

    virtual(main)
    return out[0]


def test_a_failed_rtt_probe_is_not_repeated_for_every_route_search() -> None:
    probes, seconds = dead_address_searches(3)
    assert probes == 0 and seconds < 1


def test_allowlist_routes_only_through_listed_workers() -> None:
    recs = [record(1, 0, 2, block_ms=1.0), record(2, 0, 2, block_ms=50.0), record(3, 2, 4)]

    async def main() -> None:
        allow = PeerAllowlist.of([peer(2), peer(3)])
        s = ScriptedSwarm(lambda n, b: recs, settings=settings(), allow_peers=allow)
        route = await s.find_route(0, 4)
        assert [o.peer for o in route] == [peer(2), peer(3)]       # the faster, unlisted 1 is ignored
        assert all(r.peer_id != peer(1) for r in await s.records())
        only = ScriptedSwarm(lambda n, b: recs, settings=settings(discovery_timeout=3.0),
                             allow_peers=PeerAllowlist.of([peer(3)]))
        with pytest.raises(NoRouteError, match="no worker serves layer 0"):
            await only.find_route(0, 4)

    virtual(main)


def main() -> None:
    """Print the closing-table rows measured here (virtual seconds)."""
    print(f"restarted worker announces itself while banned | before: NoRouteError at the 20 s discovery deadline "
          f"(60 s ban) | after: ban lifted by the newer record | route {ban_lift_seconds(3.0) - 3.0:.1f} s after "
          "the announcement (virtual)")
    probes, seconds = dead_address_searches(3)
    print(f"dead worker address in the records | before: probed again by every route search (10 s each) | "
          f"after: failure remembered per record | 3 searches: {probes} probes, {seconds:.1f} s (virtual)")


if __name__ == "__main__":
    main()
