"""Routing table: k-buckets, splitting only the own bucket, replacement caches, states."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.proto.krpc import Contact
from pymesh.proto.routing import GOOD_FOR, RoutingTable, distance

OWN = bytes(20)


def nid(prefix_bits: str, rest: int = 0) -> bytes:
    """An ID starting with the given bits, then ``rest`` in the low bits."""
    value = int(prefix_bits, 2) << (160 - len(prefix_bits)) if prefix_bits else 0
    return (value | rest).to_bytes(20, "big")


def contact(node_id: bytes, port: int = 1000) -> Contact:
    return Contact(node_id, ("10.0.0.1", port))


def test_far_bucket_holds_k_then_goes_to_replacements_and_asks_for_pings() -> None:
    t = RoutingTable(OWN, now=0.0, k=8)
    far = [nid("1", i + 1) for i in range(12)]
    for i, n in enumerate(far[:8]):
        assert t.heard_from(contact(n, 2000 + i), 0.0, responded=True) == []
    # The own half splits off; the far half (prefix 1) is full and never splits.
    assert len(t) == 8
    t.heard_from(contact(nid("0", 5)), 0.0, responded=True)
    assert len(t.buckets) >= 2
    pings = t.heard_from(contact(far[8]), GOOD_FOR + 1, responded=True)
    assert t.get(far[8]) is None
    assert len(pings) == 1 and pings[0].node_id == far[0]  # least recently seen, questionable now
    # The pinged node does not answer twice: it turns bad and the replacement moves in.
    t.on_timeout(far[0], GOOD_FOR + 2)
    t.on_timeout(far[0], GOOD_FOR + 3)
    assert t.get(far[0]) is None and t.get(far[8]) is not None


def test_good_nodes_are_not_evicted() -> None:
    t = RoutingTable(OWN, now=0.0, k=8)
    far = [nid("1", i + 1) for i in range(9)]
    for n in far[:8]:
        t.heard_from(contact(n), 0.0, responded=True)
    assert t.heard_from(contact(far[8]), 1.0, responded=True) == []  # all good: no ping needed
    assert t.get(far[8]) is None and len(t) == 8


def test_only_the_own_bucket_splits() -> None:
    rng = random.Random(3)
    own = rng.getrandbits(160).to_bytes(20, "big")
    t = RoutingTable(own, now=0.0, k=8, rng=rng)
    for _ in range(2000):
        t.heard_from(contact(rng.getrandbits(160).to_bytes(20, "big")), 0.0, responded=True)
    own_i = int.from_bytes(own, "big")
    # Buckets tile the ID space and each one except the deepest pair is a sibling of the
    # path to our own ID.
    assert t.buckets[0].lo == 0 and t.buckets[-1].hi == 1 << 160
    for a, b in zip(t.buckets, t.buckets[1:]):
        assert a.hi == b.lo
    for b in t.buckets:
        assert len(b.nodes) <= 8
    own_bucket = next(b for b in t.buckets if b.covers(own_i))
    for b in t.buckets:
        if b is not own_bucket:
            # the sibling of a bucket on our path: halving it would not contain us
            assert not b.covers(own_i)
    assert 8 * 8 <= len(t) <= 8 * len(t.buckets)


def test_unverified_sender_cannot_move_a_known_node() -> None:
    t = RoutingTable(OWN, now=0.0)
    n = nid("1", 7)
    t.heard_from(Contact(n, ("10.0.0.1", 1)), 0.0, responded=True)
    t.heard_from(Contact(n, ("10.6.6.6", 6)), 1.0, responded=False)
    entry = t.get(n)
    assert entry is not None and entry.addr == ("10.0.0.1", 1)


def test_refresh_targets_of_stale_buckets_fall_inside_them() -> None:
    t = RoutingTable(OWN, now=0.0)
    for i in range(20):
        t.heard_from(contact(nid("1", i + 1)), 0.0, responded=True)
        t.heard_from(contact(nid("01", i + 1)), 0.0, responded=True)
    assert t.refresh_targets(10.0, after=900) == []
    targets = t.refresh_targets(1000.0, after=900)
    assert len(targets) == len(t.buckets)
    for target, b in zip(targets, t.buckets):
        assert b.covers(int.from_bytes(target, "big"))
    assert t.refresh_targets(1001.0, after=900) == []


def test_questionable_nodes_are_offered_for_pings_once_per_window() -> None:
    t = RoutingTable(OWN, now=0.0)
    for i in range(5):
        t.heard_from(contact(nid("1", i + 1)), 0.0, responded=True)
    assert t.questionable(10.0) == []
    assert len(t.questionable(GOOD_FOR + 1)) == 5
    assert t.questionable(GOOD_FOR + 2) == []


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(min_size=20, max_size=20), min_size=1, max_size=200), st.binary(min_size=20, max_size=20))
def test_closest_is_sorted_by_xor_distance(ids: list[bytes], target: bytes) -> None:
    t = RoutingTable(OWN, now=0.0)
    for i in ids:
        t.heard_from(contact(i), 0.0, responded=True)
    got = t.closest(target, 8)
    d = [distance(c.node_id, target) for c in got]
    assert d == sorted(d)
    held = sorted(distance(e.node_id, target) for e in t.all_nodes())
    assert d == held[: len(d)]
