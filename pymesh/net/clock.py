"""One injectable clock for every timed thing in a node: DHT, records, sessions, liveness.

``monotonic()`` measures intervals and deadlines; it is trio's clock, so under trio's
``MockClock`` (``autojump_clock`` in tests) waits take no real time. ``wall()`` is Unix time
for what other machines read (signed record timestamps); :class:`TrioClock` derives it from
the same trio clock, anchored to ``time.time()`` when the clock is created, so virtual time
moves both. Sans-I/O code in ``pymesh/proto`` never sees a clock: it takes ``now`` arguments.
"""

from __future__ import annotations

import time
from typing import Protocol

import trio


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (deadlines, intervals, expiry)."""
        ...

    def wall(self) -> float:
        """Unix time in seconds (timestamps other peers read)."""
        ...


class TrioClock:
    """trio's clock (virtual under a MockClock) plus a wall clock that moves with it.

    ``monotonic()`` works only inside ``trio.run``. ``wall()`` anchors at its first call
    inside ``trio.run``; before that (a node built outside any run) it is ``time.time()``.
    """

    def __init__(self) -> None:
        self._anchor: tuple[float, float] | None = None

    def monotonic(self) -> float:
        return trio.current_time()

    def wall(self) -> float:
        try:
            now = trio.current_time()
        except RuntimeError:  # not inside trio.run
            return time.time()
        if self._anchor is None:
            self._anchor = (time.time(), now)
        wall0, mono0 = self._anchor
        return wall0 + (now - mono0)


class FakeClock:
    """A clock tests move by hand (``advance``), for code that is not under trio."""

    def __init__(self, start: float = 1000.0, wall_start: float = 1.7e9) -> None:
        self.now = start
        self._wall_offset = wall_start - start

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self._wall_offset
