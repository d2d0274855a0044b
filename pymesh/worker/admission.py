"""Fair admission to a worker's KV cache: who loses a reservation when the cache is full. Pure.

Any key can open sessions, so a full cache must not mean "first come, kept forever":

- a reservation that receives no step within ``lapse`` seconds is dropped (:func:`lapsed`);
  re-opening the same session does not extend it;
- a peer, and an address (several keys on one machine), may hold at most ``share`` of the
  budget *when others want room*: a newcomer that stays within its own share may take the
  idle sessions of a holder above its share, the biggest holder's first, never-stepped ones
  before used ones (:func:`make_room`). A newcomer that would itself exceed its share only
  gets free room, so two heavy clients cannot evict each other in turn.

Evicted sessions answer ``not_found`` at their next step; their clients reopen and replay
elsewhere, as after any worker fault.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from pymesh.proto.identity import PeerID

if TYPE_CHECKING:
    from pymesh.worker.sessions import Session


@dataclass(frozen=True)
class Admission:
    """A request for ``need`` cache tokens by ``peer`` (connected from ``host``, if known)."""

    peer: PeerID
    host: str | None
    need: int


def lapsed(sessions: Iterable["Session"], now: float, lapse: float) -> list["Session"]:
    """Reservations that never received a step and are older than ``lapse`` seconds."""
    return [s for s in sessions if not s.stepped and not s.busy and now - s.opened > lapse]


def make_room(sessions: Iterable["Session"], ask: Admission, budget: int, share: float,
              now: float) -> list["Session"]:
    """The sessions to evict so that ``ask`` fits, or ``[]`` if it cannot fairly be made to fit.

    Only sessions of peers or addresses holding more than ``share * budget`` are candidates,
    and only for a newcomer that stays within that share itself (by peer and by address).
    """
    everyone = list(sessions)
    pool = [s for s in everyone if not s.busy]
    cap = share * budget
    by_peer: Counter[PeerID] = Counter()
    by_host: Counter[str] = Counter()
    for s in everyone:
        by_peer[s.client] += s.reserved
        if s.host is not None:
            by_host[s.host] += s.reserved
    if by_peer[ask.peer] + ask.need > cap or (ask.host is not None and by_host[ask.host] + ask.need > cap):
        return []
    free = budget - sum(by_peer.values())

    def weight(s: "Session") -> int:
        return max(by_peer[s.client], by_host[s.host] if s.host is not None else 0)

    victims: list[Session] = []
    while free < ask.need:
        over = [s for s in pool if weight(s) > cap]
        if not over:
            return []
        v = max(over, key=lambda s: (weight(s), not s.stepped, now - s.last_used))
        pool.remove(v)
        victims.append(v)
        by_peer[v.client] -= v.reserved
        if v.host is not None:
            by_host[v.host] -= v.reserved
        free += v.reserved
    return victims
