"""Sans-I/O pieces against transient and dead nodes: BEP 43 read-only cores, lookups that
skip known-failed contacts and move past slow ones, soft timeouts from RTTs, and routing
tables that replace a failed node at once."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.proto import krpc
from pymesh.proto.dht_core import DHTCore
from pymesh.proto.krpc import Contact, Query, Response
from pymesh.proto.lookup import INFLIGHT, SLOW, Lookup, RttEstimator
from pymesh.proto.routing import RoutingTable, distance

NOW = 1_700_000_000.0


def ids(n: int, seed: int = 3) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.getrandbits(160).to_bytes(20, "big") for _ in range(n)]


def contact(i: bytes, port: int = 1) -> Contact:
    return Contact(i, ("10.0.0.1", port))


def test_read_only_core_sends_ro_and_answers_nothing() -> None:
    a, b = ids(2)
    ro = DHTCore(a, now=NOW, read_only=True, rng=random.Random(1))
    normal = DHTCore(b, now=NOW, rng=random.Random(2))
    _, data = ro.make_query(b"find_node", {b"target": b})
    q = krpc.decode_message_untrusted(data)
    assert isinstance(q, Query) and q.read_only
    inc = normal.receive(data, ("10.0.0.9", 7), NOW)
    assert isinstance(krpc.decode_message_untrusted(inc.reply or b""), Response)
    assert normal.routing.get(a) is None  # a read-only querier is never added
    # the read-only node ignores queries but still takes responses to its own
    _, query = normal.make_query(b"ping")
    got = ro.receive(query, ("10.0.0.8", 7), NOW)
    assert got.reply is None and got.message is None and ro.routing.get(b) is None
    tid, _ = ro.make_query(b"ping")
    resp = krpc.encode_response(tid, {b"id": b})
    assert isinstance(ro.receive(resp, ("10.0.0.8", 7), NOW).message, Response)
    # a normal querier is added as usual
    _, q2 = normal.make_query(b"ping")
    third = DHTCore(ids(3)[2], now=NOW)
    third.receive(q2, ("10.0.0.8", 7), NOW)
    assert third.routing.get(b) is not None


def test_failed_contacts_are_remembered_until_heard_from_or_expired() -> None:
    a, b, c = ids(3)
    core = DHTCore(a, now=NOW, failed_for=100.0)
    dead = contact(b)
    core.note_slow(dead, NOW)
    assert core.recently_failed(dead, NOW + 50)
    assert not core.recently_failed(contact(b, port=2), NOW + 50)  # same id, new address
    assert not core.recently_failed(dead, NOW + 100)  # expired
    core.note_timeout(c, NOW, ("10.0.0.1", 1))
    assert core.recently_failed(contact(c), NOW + 1)
    core.note_response(contact(c), NOW + 2)  # it answered after all
    assert not core.recently_failed(contact(c), NOW + 3)
    core.note_slow(dead, NOW)
    _, q = DHTCore(b, now=NOW).make_query(b"ping")
    core.receive(q, dead.addr, NOW + 1)  # it queried us: alive
    assert not core.recently_failed(dead, NOW + 2)


def test_lookup_never_queries_skipped_contacts() -> None:
    all_ids = ids(30)
    target = all_ids[0]
    dead = set(all_ids[1:10])
    lk = Lookup(target, [contact(i) for i in all_ids[1:]], k=8, alpha=3, skip=lambda c: c.node_id in dead)
    asked: list[bytes] = []
    while not lk.done:
        batch = lk.next_queries(NOW)
        assert batch
        for q in batch:
            asked.append(q.node_id)
            lk.on_response(q.node_id, [contact(i) for i in all_ids], NOW)
    assert not dead & set(asked) and lk.skipped == len(dead)
    want = sorted(set(all_ids) - dead, key=lambda i: distance(i, target))[:8]
    assert [c.node_id for c in lk.result()] == want


def test_slow_node_frees_its_slot_and_a_late_answer_still_counts() -> None:
    all_ids = ids(20)
    target = all_ids[0]
    lk = Lookup(target, [contact(i) for i in all_ids[1:]], k=4, alpha=2)
    first = lk.next_queries(NOW)
    assert len(first) == 2 and lk.next_queries(NOW) == []
    assert lk.on_slow(first[0].node_id, NOW) and not lk.on_slow(first[0].node_id, NOW)
    more = lk.next_queries(NOW)  # its slot went to the next candidate
    assert len(more) == 1 and lk.pending_slow == 1
    lk.on_response(first[0].node_id, [], NOW)
    assert lk.pending_slow == 0 and first[0] in lk.answered()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.sets(st.integers(1, 39), max_size=25))
def test_lookup_over_a_network_with_dead_nodes_ends_with_live_answers(seed: int, dead_ix: set[int]) -> None:
    """Every dead node is slow first, then fails; the lookup ends, never waits on a dead
    node after it went slow, and returns only live nodes."""
    all_ids = ids(40, seed=seed)
    dead = {all_ids[i] for i in dead_ix}
    target = random.Random(seed).getrandbits(160).to_bytes(20, "big")
    lk = Lookup(target, [contact(i) for i in all_ids[:10]], k=8, alpha=3)
    for _ in range(500):
        if lk.done:
            break
        lk.next_queries(NOW)
        inflight = [c for c in lk._sorted if c.state == INFLIGHT]
        if not inflight:
            slow = [c for c in lk._sorted if c.state == SLOW]
            assert slow, "not done, nothing in flight and nothing pending"
            lk.on_timeout(slow[0].contact.node_id, NOW)
            continue
        for cand in inflight:
            nid = cand.contact.node_id
            if nid in dead:
                lk.on_slow(nid, NOW)
            else:
                lk.on_response(nid, [contact(i) for i in all_ids], NOW)
    assert lk.done
    assert not {c.node_id for c in lk.result()} & dead


def test_rtt_estimator_soft_timeout_is_bounded() -> None:
    est = RttEstimator(floor=0.25)
    addr = ("10.0.0.1", 1)
    assert est.soft_timeout(addr, 2.0) == 2.0  # nothing measured yet
    for _ in range(20):
        est.observe(addr, 0.001)
    assert est.soft_timeout(addr, 2.0) == 0.25
    far = ("10.0.0.2", 1)
    for _ in range(50):
        est.observe(far, 0.2)
    assert 0.75 < est.soft_timeout(far, 2.0) <= 0.8
    for _ in range(50):
        est.observe(far, 5.0)
    assert est.soft_timeout(far, 2.0) == 2.0
    assert est.soft_timeout(("10.0.0.3", 1), 2.0) == min(2.0, max(0.25, 4 * (est.srtt or 0)))


def test_failed_node_gives_way_to_a_cached_replacement_at_once() -> None:
    own = bytes(20)
    t = RoutingTable(own, now=0.0, k=2)
    far = [(0x80 + i).to_bytes(1, "big") + bytes(19) for i in range(3)]
    for i, n in enumerate(far):
        t.heard_from(Contact(n, ("10.0.0.1", 100 + i)), 0.0, responded=True)
    assert t.get(far[2]) is None  # full bucket: cached as a replacement
    t.on_timeout(far[0], 1.0)  # one failure is enough while a replacement waits
    assert t.get(far[0]) is None and t.get(far[2]) is not None
    t.on_timeout(far[1], 2.0)  # no replacement left: it stays (questionable) for now
    assert t.get(far[1]) is not None


def test_a_lone_slow_node_is_still_waited_for() -> None:
    """Only one contact (the bootstrap) and it is slow: the lookup must not give up at the
    soft timeout with nothing, but take its late answer."""
    boot, *others = ids(10)
    target = others[0]
    lk = Lookup(target, [contact(boot)], k=8, alpha=3)
    assert lk.next_queries(NOW) == [contact(boot)]
    lk.on_slow(boot, NOW)
    assert not lk.done and lk.next_queries(NOW) == []
    lk.on_response(boot, [contact(i) for i in others], NOW)
    assert not lk.done and len(lk.next_queries(NOW)) == 3
    # once someone has answered, a slow node no longer holds the lookup up
    for q in lk._sorted:
        if q.state == INFLIGHT:
            lk.on_slow(q.contact.node_id, NOW)
    while not lk.done:
        for q in lk.next_queries(NOW):
            lk.on_slow(q.node_id, NOW)
    assert lk.result() == [contact(boot)]


def test_when_every_contact_was_skipped_they_are_asked_anyway() -> None:
    """After the node's own network was down every contact is marked failed; the memory
    must not leave it isolated: a lookup with nothing else asks the skipped ones."""
    all_ids = ids(12)
    target = all_ids[0]
    lk = Lookup(target, [contact(i) for i in all_ids[1:]], k=8, alpha=3, skip=lambda c: True)
    assert lk.skipped == 11 and not lk.done
    first = lk.next_queries(NOW)
    assert len(first) == 3
    for q in first:
        lk.on_response(q.node_id, [], NOW)
    while not lk.done:
        for q in lk.next_queries(NOW):
            lk.on_response(q.node_id, [], NOW)
    assert len(lk.result()) == 8
