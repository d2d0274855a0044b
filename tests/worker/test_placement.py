"""Block placement (pure)."""

from __future__ import annotations

from pymesh.worker.placement import (
    Announced,
    block_parameter_count,
    block_throughputs,
    blocks_that_fit,
    choose_start,
    should_move,
)


def test_empty_swarm_starts_at_zero_and_gaps_come_first() -> None:
    assert choose_start(30, 15, []) == 0
    assert choose_start(30, 15, [Announced(0, 15, 10.0)]) == 15
    # A gap in the middle is closed before the weaker end is reinforced.
    recs = [Announced(0, 10, 10.0), Announced(20, 30, 1.0)]
    assert choose_start(30, 10, recs) == 10


def test_weakest_blocks_are_reinforced() -> None:
    recs = [Announced(0, 10, 50.0), Announced(10, 20, 5.0), Announced(20, 30, 50.0)]
    assert choose_start(30, 10, recs) == 10
    assert block_throughputs(4, [Announced(0, 2, 3.0), Announced(1, 4, 1.0)]) == [3.0, 4.0, 1.0, 1.0]


def test_two_joining_workers_cover_everything() -> None:
    first = Announced(choose_start(30, 15, []), 0, 1.0)
    first = Announced(first.start, first.start + 15, 1.0)
    second_start = choose_start(30, 15, [first])
    covered = set(range(first.start, first.stop)) | set(range(second_start, second_start + 15))
    assert covered == set(range(30))


def test_move_to_cover_uncovered_blocks() -> None:
    # Two workers on 0-14, nobody on 15-29 (the worker there left): one of them moves.
    mine, other = Announced(0, 15, 1.0), Announced(0, 15, 1.0)
    d = should_move(30, mine, [other])
    assert d.move and d.new_start == 15 and "nobody serves" in d.reason


def test_no_move_when_it_would_uncover_or_gain_little() -> None:
    d = should_move(30, Announced(0, 15, 1.0), [Announced(15, 30, 1.0)])
    assert not d.move
    # Bottleneck improves only from 10 to 11 -> below the margin.
    others = [Announced(0, 10, 10.0), Announced(10, 20, 10.0), Announced(20, 30, 10.0), Announced(10, 20, 1.0)]
    assert not should_move(30, Announced(0, 10, 1.0), others).move
    # The bottleneck is a single block span served weakly; a strong worker doubling up
    # elsewhere moves onto it.
    d = should_move(30, Announced(10, 20, 10.0), [Announced(0, 10, 10.0), Announced(10, 20, 10.0), Announced(20, 30, 2.0)])
    assert d.move and d.new_start == 20 and "bottleneck" in d.reason
    others = [Announced(0, 10, 10.0), Announced(0, 10, 10.0), Announced(10, 20, 10.0), Announced(20, 30, 10.0)]
    d = should_move(30, Announced(0, 10, 10.0), others)
    assert not d.move  # bottleneck stays 10 wherever it goes: not worth it


def test_blocks_that_fit() -> None:
    per = block_parameter_count(576, 1536, 9, 3, 64) * 4
    assert per > 0
    assert blocks_that_fit(10 * per, per, 0, 0, 30, safety=1.0) == 10
    assert blocks_that_fit(100 * per, per, 0, 0, 30) == 30
    assert blocks_that_fit(100 * per, per, 0, 0, 30, max_blocks=15) == 15
    assert blocks_that_fit(0, per, 0, 0, 30) == 1


def test_leaving_blocks_only_this_worker_serves_is_never_a_move() -> None:
    # We alone serve 0-4 (another worker has 5-9); moving to 10-19 closes 10 blocks of the
    # 20-block gap but opens a new one at 0-4: stay (the gap is someone else's to close).
    d = should_move(30, Announced(0, 10, 1.0), [Announced(5, 10, 1.0)])
    assert not d.move and "only this worker" in d.reason


def test_fake_gaps_that_come_and_go_never_move_a_worker() -> None:
    from pymesh.worker.placement import MoveDecision, MoveGuard

    guard = MoveGuard()
    flapping = [MoveDecision(True, 10, "gap"), MoveDecision(True, 20, "gap"), MoveDecision(False, 0, "fine")]
    moves = sum(guard.admit(flapping[i % 3]) for i in range(30))
    assert moves == 0
    # A gap that persists moves the worker once, then not again within the cooldown.
    persistent = MoveDecision(True, 10, "gap")
    admitted = [guard.admit(persistent) for _ in range(10)]
    assert admitted[:2] == [False, True] and sum(admitted) <= 3
    assert admitted[2:5] == [False] * 3          # the cooldown: three checks


def test_placement_counts_only_online_listed_records_of_this_model() -> None:
    import trio

    from pymesh.net.clock import FakeClock
    from pymesh.proto.allowlist import PeerAllowlist
    from pymesh.proto.identity import Identity
    from pymesh.proto.records import WorkerRecord
    from pymesh.proto.vocab import Transport
    from pymesh.worker.directory import RecordDirectory
    from pymesh.worker.server import Worker, WorkerOptions

    a, b, c = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))

    def rec(who: Identity, start: int, state: str, model: str = "echo") -> WorkerRecord:
        return WorkerRecord(model_id=model, start=start, stop=start + 2, host="10.0.0.1", port=4000,
                            transports=("quic",), state=state).signed(who)

    served = [rec(a, 0, "online"), rec(b, 2, "joining"), rec(c, 4, "online"), rec(a, 6, "offline"),
              rec(b, 8, "online", model="other")]

    async def read() -> list[WorkerRecord]:
        return served

    w = Worker(WorkerOptions(bootstrap=[], allow_peers=PeerAllowlist.of([a.peer_id, b.peer_id])))
    w.directory = RecordDirectory(read, FakeClock(), (Transport.QUIC,), model_id=w.model_id)

    async def main() -> None:
        online = await w._other_records(online_only=True)
        assert [(r.peer_id, r.start) for r in online] == [(a.peer_id, 0)]     # c is not listed
        assert len(await w._other_records()) == 2                              # joining ones settle spans

    trio.run(main)
