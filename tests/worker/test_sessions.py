"""Session bookkeeping: budget, refusal, step order, expiry (pure)."""

from __future__ import annotations

import pytest

from pymesh.proto.identity import PeerID
from pymesh.worker.sessions import SessionError, SessionTable, advance, check_step

CLIENT = PeerID(b"\x01" * 32)


def test_budget_and_refusal() -> None:
    t = SessionTable(budget_tokens=100, idle_timeout=10)
    t.open(b"a", CLIENT, 60, 1, None, now=0)
    assert t.free_tokens == 40
    with pytest.raises(SessionError) as info:
        t.open(b"b", CLIENT, 50, 1, None, now=0)
    assert info.value.code == "refused" and "40 of 100" in info.value.message
    t.close(b"a")
    t.open(b"b", CLIENT, 50, 2, None, now=0)
    assert t.free_tokens == 0


def test_idle_sessions_expire_and_free_the_cache() -> None:
    t = SessionTable(budget_tokens=100, idle_timeout=5)
    t.open(b"a", CLIENT, 50, 1, None, now=0)
    t.open(b"b", CLIENT, 50, 1, None, now=3)
    assert t.expire(now=4) == []
    t.get(b"b", now=7)
    assert t.expire(now=6) == [b"a"]
    assert t.free_tokens == 50 and t.expired == 1
    with pytest.raises(SessionError, match="no such session"):
        t.get(b"a")


def test_step_order() -> None:
    t = SessionTable(budget_tokens=100, idle_timeout=5)
    s = t.open(b"a", CLIENT, 20, 1, None, now=0)
    assert check_step(s, 0, 0, 7) == "next"
    advance(s, 0, 0, 7)
    assert check_step(s, 2, 8, 1) == "future"
    assert check_step(s, 0, 0, 7) == "retry"
    with pytest.raises(SessionError, match="does not match"):
        check_step(s, 0, 0, 6)
    with pytest.raises(SessionError, match="starts at position"):
        check_step(s, 1, 9, 1)
    assert check_step(s, 1, 7, 1) == "next"
    advance(s, 1, 7, 1)
    with pytest.raises(SessionError, match="stale"):
        check_step(s, 0, 0, 7)
    with pytest.raises(SessionError) as info:
        check_step(s, 2, 8, 13)
    assert info.value.code == "refused"


OTHER, THIRD = PeerID(b"\x02" * 32), PeerID(b"\x03" * 32)


def test_a_retry_is_served_at_most_max_retries_times() -> None:
    from pymesh.worker.sessions import MAX_RETRIES

    s = SessionTable(budget_tokens=100, idle_timeout=5).open(b"a", CLIENT, 20, 1, None, now=0)
    advance(s, 0, 0, 2)
    for _ in range(MAX_RETRIES):
        assert check_step(s, 0, 0, 2) == "retry"
        advance(s, 0, 0, 2)
    with pytest.raises(SessionError, match="retried 3 times") as info:
        check_step(s, 0, 0, 2)
    assert info.value.code == "bad_request"
    assert check_step(s, 1, 2, 1) == "next"           # the next step is fine, and resets the count
    advance(s, 1, 2, 1)
    assert s.retries == 0 and check_step(s, 1, 2, 1) == "retry"


def test_reservations_without_a_step_lapse_and_reopening_does_not_renew_them() -> None:
    t = SessionTable(budget_tokens=100, idle_timeout=300, lapse=30)
    t.open(b"idle", CLIENT, 40, 1, None, now=0)
    used = t.open(b"used", CLIENT, 40, 1, None, now=0)
    advance(used, 0, 0, 1)
    t.open(b"idle", CLIENT, 40, 1, None, now=25)       # re-opened: same reservation, same lapse
    assert t.expire(now=29) == []
    assert t.expire(now=31) == [b"idle"] and list(t.sessions) == [b"used"]


def test_a_full_cache_evicts_the_biggest_holder_above_its_share_for_a_newcomer() -> None:
    t = SessionTable(budget_tokens=100, idle_timeout=300, lapse=30)
    for i in range(5):                                 # one peer takes everything it can
        t.open(bytes([i]), CLIENT, 20, 1, None, now=i)
    advance(t.sessions[b"\x00"], 0, 0, 1)              # one of them is even in use
    s = t.open(b"honest", OTHER, 20, 1, None, now=10)  # served at once: the hog loses an unused one
    assert s.client == OTHER and t.evicted == 1 and b"\x00" in t.sessions
    # A newcomer that would itself hold more than half gets free room only.
    with pytest.raises(SessionError) as info:
        t.open(b"greedy", OTHER, 40, 1, None, now=11)
    assert info.value.code == "refused" and t.evicted == 1
    # Busy sessions are never evicted.
    for sess in t.sessions.values():
        sess.busy = True
    with pytest.raises(SessionError):
        t.open(b"third", THIRD, 10, 1, None, now=12)


def test_many_keys_from_one_address_share_one_quota() -> None:
    t = SessionTable(budget_tokens=100, idle_timeout=300, lapse=30)
    sybils = [PeerID(bytes([10 + i]) * 32) for i in range(5)]
    for i, p in enumerate(sybils):
        advance(t.open(bytes([i]), p, 20, 1, None, now=0, host="10.0.0.66"), 0, 0, 1)
    # Each key holds a fifth, but their address holds it all: an honest client gets in.
    t.open(b"honest", OTHER, 30, 1, None, now=1, host="10.0.0.7")
    assert t.evicted == 2 and sum(s.reserved for s in t.sessions.values() if s.host == "10.0.0.66") == 60
