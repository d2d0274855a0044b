"""Waiting briefly for company that is due: the hold of the worker's step batcher and of the
client's LM-head batcher.

A batcher that runs whatever is ready when it gets free splits sessions that step together
into small groups whenever their requests arrive a little apart: a worker sends the results
of one batched forward one by one, so the first of them finds the next device idle and runs
alone, and the others form a second, later pass (on the worker a group that split stays split:
the groups travel the route apart). Every request notes its session's arrival here; before a
pass the batcher calls :meth:`Cadence.hold`, which waits, at most ``limit`` seconds, while a
session that is not queued yet steps at a steady interval and should arrive within the wait.
A lone session never waits, nor one that went quiet (twice its interval late).
"""

from __future__ import annotations

from typing import Callable, Hashable

import trio

#: a session not heard from for this many seconds is forgotten (when the table is pruned)
FORGET_AFTER = 10.0


class Cadence:
    """When each session's requests arrive, and whether one is due (see the module doc)."""

    def __init__(self, prune_above: int = 256) -> None:
        #: session key -> (when its last request arrived, the interval before it; 0: first)
        self.beats: dict[Hashable, tuple[float, float]] = {}
        self.prune_at = self.prune_above = prune_above
        self._arrived: trio.Event | None = None

    def note(self, key: Hashable) -> None:
        """A request of session ``key`` arrived now (wakes a :meth:`hold` in progress)."""
        now = trio.current_time()
        last = self.beats.get(key)
        self.beats[key] = (now, now - last[0] if last is not None else 0.0)
        if len(self.beats) > self.prune_at:  # forget sessions that went quiet
            horizon = now - FORGET_AFTER
            self.beats = {k: v for k, v in self.beats.items() if v[0] >= horizon}
            # with many live sessions the next scan waits until the table doubles (amortised)
            self.prune_at = max(self.prune_above, 2 * len(self.beats))
        if self._arrived is not None:
            self._arrived.set()

    def due(self, queued: set[Hashable], now: float, deadline: float) -> bool:
        """Whether a session not in ``queued`` should send its next request by ``deadline``."""
        return any(k not in queued and gap > 0.0 and last + gap <= deadline and now - last < 2.0 * gap
                   for k, (last, gap) in self.beats.items())

    async def hold(self, limit: float, queued: Callable[[], set[Hashable]]) -> None:
        """Wait at most ``limit`` seconds while a session outside ``queued()`` is due."""
        if limit <= 0.0 or len(self.beats) < 2:
            return
        now = trio.current_time()
        deadline = now + limit
        try:
            while now < deadline and self.due(queued(), now, deadline):
                self._arrived = trio.Event()
                with trio.move_on_at(deadline):
                    await self._arrived.wait()
                now = trio.current_time()
        finally:
            self._arrived = None
