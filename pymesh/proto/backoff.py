"""Per-key retry back-off with no I/O and no clock (callers pass ``now``).

The DHT node re-queries bootstrap addresses that stopped answering: each silent address
waits ``period`` after its first miss, then twice as long after each further miss, up to
``min(8 * period, 300)`` seconds; an answer resets it.
"""

from __future__ import annotations

from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)

#: The longest wait, whatever the period.
MAX_BACKOFF = 300.0


class Backoff(Generic[K]):
    def __init__(self) -> None:
        self._state: dict[K, tuple[float, float]] = {}  # key -> (next try at, current wait)

    def due(self, key: K, now: float) -> bool:
        """Whether ``key`` may be tried at ``now`` (always, until it has failed)."""
        state = self._state.get(key)
        return state is None or now >= state[0]

    def succeeded(self, key: K) -> None:
        self._state.pop(key, None)

    def failed(self, key: K, now: float, period: float) -> float:
        """Record a miss at ``now``; returns the wait before the next try."""
        wait = self._state.get(key, (0.0, period / 2))[1]
        wait = min(2 * wait, 8 * period, MAX_BACKOFF)
        self._state[key] = (now + wait, wait)
        return wait

    def wait(self, key: K) -> float | None:
        """The current wait of ``key`` (None while it has not failed)."""
        state = self._state.get(key)
        return None if state is None else state[1]

    def __contains__(self, key: object) -> bool:
        return key in self._state
