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
