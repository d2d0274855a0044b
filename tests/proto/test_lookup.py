"""The lookup state machine, driven by hand and over a small in-memory network."""

from __future__ import annotations

import random

from pymesh.proto.krpc import Contact
from pymesh.proto.lookup import Lookup
from pymesh.proto.routing import distance


def make_ids(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.getrandbits(160).to_bytes(20, "big") for _ in range(n)]


def c(i: bytes) -> Contact:
    return Contact(i, ("10.0.0.1", 1))


def test_alpha_in_flight_and_termination_when_k_closest_answered() -> None:
    ids = make_ids(40)
    target = ids[0]
    by_dist = sorted(ids, key=lambda i: distance(i, target))
    lk = Lookup(target, [c(i) for i in ids[:20]], k=8, alpha=3)
    first = lk.next_queries(0.0)
    assert len(first) == 3 and lk.inflight == 3
    assert lk.next_queries(0.0) == []  # alpha already in flight
    # Every queried node answers with the whole set: the lookup must end holding the
    # 8 closest overall, each of which answered.
    pending = list(first)
    while pending:
        q = pending.pop(0)
        lk.on_response(q.node_id, [c(i) for i in ids], 0.0)
        pending += lk.next_queries(0.0)
    assert lk.done
    assert [x.node_id for x in lk.result()] == by_dist[:8]


def test_timeouts_are_skipped_and_replaced() -> None:
    ids = make_ids(30, seed=9)
    target = ids[0]
    dead = set(sorted(ids, key=lambda i: distance(i, target))[:3])
    lk = Lookup(target, [c(i) for i in ids], k=8, alpha=3)
    while not lk.done:
        batch = lk.next_queries(0.0)
        assert batch, "lookup stalled"
        for q in batch:
            if q.node_id in dead:
                lk.on_timeout(q.node_id, 1.0)
            else:
                lk.on_response(q.node_id, [], 1.0)
    got = [x.node_id for x in lk.result()]
    live = [i for i in sorted(ids, key=lambda i: distance(i, target)) if i not in dead]
    assert got == live[:8] and lk.timeouts == 3


def test_no_progress_batch_queries_the_rest_of_the_k_closest() -> None:
    ids = make_ids(20, seed=2)
    lk = Lookup(ids[0], [c(i) for i in ids], k=8, alpha=3)
    for q in lk.next_queries(0.0):
        lk.on_response(q.node_id, [], 0.0)  # nothing closer
    second = lk.next_queries(0.0)
    assert len(second) == 5  # the remaining 5 of the 8 closest at once
    for q in second:
        lk.on_response(q.node_id, [], 0.0)
    assert lk.done and lk.rounds == 2 and lk.messages == 8


def test_own_id_and_duplicates_ignored_and_query_cap() -> None:
    ids = make_ids(300, seed=4)
    lk = Lookup(ids[0], [c(i) for i in ids[:5]] + [c(ids[1])], own_id=ids[1], max_queries=10)
    assert ids[1] not in {x.contact.node_id for x in lk._sorted}
    rounds = 0
    while not lk.done and rounds < 100:
        rounds += 1
        for q in lk.next_queries(0.0):
            lk.on_response(q.node_id, [c(i) for i in random.Random(rounds).sample(ids, 20)], 0.0)
    assert lk.done and lk.messages <= 10


def test_empty_seed_is_done() -> None:
    lk = Lookup(bytes(20), [])
    assert lk.done and lk.next_queries(0.0) == [] and lk.result() == []
