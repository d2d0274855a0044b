"""Cadence (pymesh/net/cadence.py): who steps at a steady interval and is due soon; the table
of sessions stays bounded by forgetting the quiet ones, in amortised time."""

from __future__ import annotations

import trio
import trio.testing

from pymesh.net.cadence import FORGET_AFTER, Cadence


def test_due_needs_a_steady_beat_not_queued_and_not_quiet() -> None:
    c = Cadence()

    async def main() -> None:
        c.note("a")
        await trio.sleep(0.1)
        c.note("a")                       # a steps every 0.1 s: due again at +0.1
        now = trio.current_time()
        assert c.due(set(), now, now + 0.1) and not c.due(set(), now, now + 0.05)
        assert not c.due({"a"}, now, now + 0.1), "a queued session is not waited for"
        c.note("b")                       # one request: no beat yet
        assert not c.due({"a"}, now, now + 1.0)
        await trio.sleep(0.25)            # a missed two beats: quiet
        now = trio.current_time()
        assert not c.due(set(), now, now + 0.1)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_quiet_sessions_are_forgotten_and_the_scan_is_amortised() -> None:
    c = Cadence(prune_above=8)

    async def main() -> None:
        for i in range(8):
            c.note(i)
        await trio.sleep(FORGET_AFTER + 1)
        c.note("new")                     # 9 > 8: the 8 quiet ones go
        assert set(c.beats) == {"new"}
        scans = 0
        for i in range(40):               # 41 live sessions: nothing to forget, the table grows
            before = c.prune_at
            c.note(("live", i))
            scans += c.prune_at != before
        assert len(c.beats) == 41 and c.prune_at > 41
        assert scans == 3, "scanned when the table doubled (at 9, 19 and 39 entries), not at every note"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
