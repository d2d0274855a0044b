"""The recovery planner: which hops to open, re-link, flush, replay and close (no I/O)."""

from __future__ import annotations

from typing import Mapping, Sequence

from pymesh.client.recovery import Flush, HopKey, Link, Missing, OpenHop, RecoveryPlan, Relink, Replay, hop_key, plan
from pymesh.client.routing import SpanOption
from pymesh.proto.identity import PeerID


def peer(name: str) -> PeerID:
    return PeerID(name.encode().ljust(32, b"\0"))


def hop(name: str, start: int, stop: int) -> SpanOption:
    return SpanOption(peer(name), start, stop, "127.0.0.1", 1000 + start)


A, B, C = hop("a", 0, 2), hop("b", 2, 4), hop("c", 4, 6)
A2, B2, C2 = hop("a2", 0, 2), hop("b2", 2, 4), hop("c2", 4, 6)


def links_of(route: Sequence[SpanOption]) -> dict[HopKey, Link]:
    return {hop_key(o): Link(o, hop_key(route[i + 1]) if i + 1 < len(route) else None,
                             route[i - 1].peer if i > 0 else None) for i, o in enumerate(route)}


def full(boundaries: Sequence[int], steps: int) -> dict[int, set[int]]:
    return {b: set(range(steps)) for b in boundaries}


def names(hops: Sequence[SpanOption]) -> list[str]:
    return [o.describe() for o in hops]


def run(old: Sequence[SpanOption], new: Sequence[SpanOption], history: Mapping[int, set[int]], step: int,
        **kw: object) -> RecoveryPlan:
    return plan(old, new, links_of(old), history, step, **kw)  # type: ignore[arg-type]


def test_first_hop_dead_replays_from_the_clients_own_inputs() -> None:
    p = run([A, B, C], [A2, B, C], full([0], 5), 5, dead={A.peer})
    assert p.missing is None
    assert p.opens == (OpenHop(A2, B),)
    assert p.relinks == (Relink(B, C, A2.peer),)   # B takes its steps from A2 now
    assert p.flushes == ()
    assert p.replays == (Replay(A2, 5, store=True),)
    assert p.closes == ()                # the dead hop is not asked to close


def test_middle_hop_dead_relinks_its_predecessor_and_flushes_unsent_copies() -> None:
    history = {0: set(range(5)), 2: {0, 1}}      # A pushed copies of steps 0-1 only
    p = run([A, B, C], [A, B2, C], history, 5, dead={B.peer})
    assert p.opens == (OpenHop(B2, C, A.peer),)
    assert p.relinks == (Relink(A, B2), Relink(C, None, B2.peer))
    assert p.flushes == (Flush(2, A, (2, 3, 4)),)
    assert p.replays == (Replay(B2, 5, store=True),)
    assert p.new_hops == (B2,)


def test_middle_hop_dead_with_every_copy_held_needs_no_flush() -> None:
    p = run([A, B, C], [A, B2, C], full([0, 2, 4], 5), 5, dead={B.peer})
    assert p.flushes == ()
    assert p.replays == (Replay(B2, 5, store=True),)


def test_last_hop_dead_keeps_its_outputs_out_of_history() -> None:
    p = run([A, B, C], [A, B, C2], full([0, 2, 4], 3), 3, dead={C.peer})
    assert p.opens == (OpenHop(C2, None, B.peer),)
    assert p.relinks == (Relink(B, C2, A.peer),)
    assert p.replays == (Replay(C2, 3, store=False),)


def test_two_hops_dead_replays_in_route_order_and_chains_outputs() -> None:
    history = {0: set(range(4)), 2: {0}, 4: set()}
    p = run([A, B, C], [A, B2, C2], history, 4, dead={B.peer, C.peer})
    assert p.opens == (OpenHop(C2, None, B2.peer), OpenHop(B2, C2, A.peer))     # last first
    assert p.relinks == (Relink(A, B2),)
    # C2's inputs come from B2's replay, so only boundary 2 needs a flush
    assert p.flushes == (Flush(2, A, (1, 2, 3)),)
    assert p.replays == (Replay(B2, 4, store=True), Replay(C2, 4, store=False))


def test_flush_impossible_when_the_source_died_too() -> None:
    # A is on the new route (its replacement is not known yet) but is dead: nobody can
    # supply the inputs at block 2 the client does not hold.
    history = {0: set(range(3)), 2: {0}}
    p = run([A, B, C], [A, B2, C], history, 3, dead={A.peer, B.peer})
    assert p.missing == Missing(2, (1, 2), A)
    assert p.opens == () and p.replays == () and p.closes == ()
    assert "step 1 for block 2" in p.missing.describe()


def test_missing_client_inputs_are_reported() -> None:
    p = run([A, B, C], [A2, B, C], {0: {0, 2}}, 3)
    assert p.missing == Missing(0, (1,), None)


def test_step_zero_opens_without_replaying() -> None:
    p = run([A, B, C], [A, B2, C], {0: set()}, 0, dead={B.peer})
    assert p.opens == (OpenHop(B2, C, A.peer),) and p.replays == () and p.flushes == ()


def test_fresh_session_opens_every_hop_last_first() -> None:
    p = plan([], [A, B, C], {}, {0: set()}, 0)
    assert p.opens == (OpenHop(C, None, B.peer), OpenHop(B, C, A.peer), OpenHop(A, B))
    assert p.relinks == () and p.replays == () and p.closes == ()


def test_replacement_that_fails_halfway_is_replanned_from_what_was_done() -> None:
    history = {0: set(range(4)), 2: set(range(4)), 4: set(range(4))}
    first = run([A, B, C], [A, B2, C], history, 4, dead={B.peer})
    assert first.new_hops == (B2,)
    # Executed half-way: B2 opened (pointing at C) and A re-linked to B2, then B2 died
    # during its replay. The session bans B2 and finds B3; the hops holding a valid
    # cache are still A and C.
    links = links_of([A, B2, C])
    B3 = hop("b3", 2, 4)
    second = plan([A, C], [A, B3, C], links, history, 4, dead={B.peer, B2.peer})
    assert second.opens == (OpenHop(B3, C, A.peer),)
    assert second.relinks == (Relink(A, B3), Relink(C, None, B3.peer))
    assert second.replays == (Replay(B3, 4, store=True),)
    assert second.closes == ()         # B2 is dead: not asked


def test_opened_but_unused_hop_of_a_failed_attempt_is_closed() -> None:
    # Attempt one opened C2 and B2 (last first), then B2 failed its replay; attempt two
    # routes around differently, keeping C: C2 holds a session nobody will use.
    links = {**links_of([A, B, C]), hop_key(C2): Link(C2, None, B2.peer), hop_key(B2): Link(B2, hop_key(C2), A.peer)}
    B3 = hop("b3", 2, 4)
    p = plan([A, C], [A, B3, C], links, full([0, 2, 4], 2), 2, dead={B.peer, B2.peer})
    assert p.closes == (C2,)
    assert p.opens == (OpenHop(B3, C, A.peer),)


def test_hop_opened_but_not_replayed_is_opened_again() -> None:
    # B2 opened, then the flush from A failed; A is banned. B2's cache is empty: it is not
    # among the hops holding a cache, so it is opened (reset) and replayed again.
    links = {**links_of([A, B, C]), hop_key(B2): Link(B2, hop_key(C), A.peer)}
    p = plan([B, C], [A2, B2, C], links, full([0], 3), 3, dead={A.peer, B.peer})
    assert p.opens == (OpenHop(B2, C, A2.peer), OpenHop(A2, B2))
    assert p.replays == (Replay(A2, 3, store=True), Replay(B2, 3, store=True))
    assert p.flushes == ()             # boundary 2 comes from A2's replay
    assert p.closes == ()


def test_resplit_spans_close_old_hops_and_chain_replays() -> None:
    # Old route A[0-2] B[2-4] C[4-6]; B dies. The new route splits blocks 2-6 as
    # D[2-3] E[3-6]: C is no longer used and is closed.
    D, E = hop("d", 2, 3), hop("e", 3, 6)
    history = {0: set(range(6)), 2: set(range(6)), 4: set(range(6))}
    p = run([A, B, C], [A, D, E], history, 6, dead={B.peer})
    assert p.opens == (OpenHop(E, None, D.peer), OpenHop(D, E, A.peer))
    assert p.relinks == (Relink(A, D),)
    assert p.flushes == ()              # boundary 3 never existed, but D's replay fills it
    assert p.replays == (Replay(D, 6, store=True), Replay(E, 6, store=False))
    assert names(p.closes) == names([C])


def test_resplit_merging_spans_closes_both_old_hops() -> None:
    # A[0-2] dies; one worker serving 0-4 replaces A and B together.
    W = hop("w", 0, 4)
    p = run([A, B, C], [W, C], full([0], 2), 2, dead={A.peer})
    assert p.opens == (OpenHop(W, C),)
    assert p.relinks == (Relink(C, None, W.peer),)
    assert p.replays == (Replay(W, 2, store=True),)
    assert names(p.closes) == names([B])


def test_unchanged_route_needs_nothing() -> None:
    links = links_of([A, B, C])
    p = plan([A, B, C], [A, B, C], links, full([0], 1), 1)
    assert p == RecoveryPlan((A, B, C))


def test_every_open_and_relink_names_the_expected_previous_hop() -> None:
    # issue 11: a worker takes steps only from the hop the client names as prev
    p = plan([], [A, B, C], {}, {0: set()}, 0)
    assert {o.hop.peer: o.prev for o in p.opens} == {A.peer: None, B.peer: A.peer, C.peer: B.peer}


def test_a_failed_link_relinks_the_same_successor_and_keeps_both_hops() -> None:
    # A's push to B failed (the link, not B): the session drops A's link; the plan points
    # A at B again (A re-dials) and opens, replays and closes nothing.
    links = links_of([A, B, C])
    del links[hop_key(A)]
    p = plan([A, B, C], [A, B, C], links, full([0, 2, 4], 3), 3)
    assert p.relinks == (Relink(A, B),)
    assert p.opens == () and p.replays == () and p.closes == ()


def test_a_hop_that_lost_its_session_is_reopened_in_place_and_replayed() -> None:
    # B restarted (same identity): it is not among the hops holding a cache any more, but it
    # is still on the route; it is opened again behind A and replayed, nobody is closed.
    p = plan([A, C], [A, B, C], links_of([A, B, C]), full([0, 2, 4], 3), 3)
    assert p.opens == (OpenHop(B, C, A.peer),)
    assert p.replays == (Replay(B, 3, store=True),)
    assert p.relinks == () and p.closes == ()
