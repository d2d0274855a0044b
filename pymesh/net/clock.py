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


#: (time.time(), trio.current_time()) taken once per trio run, shared by every TrioClock in
#: it: nodes created at different virtual times must agree on the wall time.
_ANCHOR: trio.lowlevel.RunVar[tuple[float, float]] = trio.lowlevel.RunVar("pymesh_wall_anchor")


class TrioClock:
    """trio's clock (virtual under a MockClock) plus a wall clock that moves with it.

    ``monotonic()`` works only inside ``trio.run``. ``wall()`` is anchored to ``time.time()``
    once per run (every TrioClock of the run shares the anchor, so virtual time moves all of
    them alike); outside any run it is plain ``time.time()``.
    """

    def monotonic(self) -> float:
        return trio.current_time()

    def wall(self) -> float:
        try:
            now = trio.current_time()
        except RuntimeError:  # not inside trio.run
            return time.time()
        try:
            wall0, mono0 = _ANCHOR.get()
        except LookupError:
            wall0, mono0 = time.time(), now
            _ANCHOR.set((wall0, mono0))
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
