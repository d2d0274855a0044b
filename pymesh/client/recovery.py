"""Recovery planning: what to do when a session's route changes. Pure, no I/O.

A session holds a cache on every hop of its route. When a hop fails, the client picks a
new route (keeping the healthy hops, see ``choose_route(prefer=...)``) and :func:`plan`
works out how to get from the hops that hold a valid cache to the new route:

- open a session on every hop of the new route without one (last first, so each hop's
  successor is there when it is told about it);
- point kept hops whose successor or predecessor changed at the new ones (``pm.set_next``;
  a worker accepts steps only from the previous hop it was told about, ``prev``), and kept
  hops whose link failed at the same successor again (it re-dials);
- fetch the recovery copies a kept hop has not pushed yet (``pm.flush``), where a new hop
  needs inputs the client does not hold;
- replay the stored inputs of steps ``0..step-1`` through every new hop, in route order
  (a new hop's outputs are the inputs of the new hop after it);
- close the hops that hold a session but are not on the new route (dead ones excepted).

The session executes the plan and keeps its results in ``links`` (what every open hop
pushes to) and in the set of hops whose cache is valid, so a plan that fails half-way is
re-planned from where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

from pymesh.client.routing import SpanOption
from pymesh.proto.identity import PeerID

#: a hop as the session knows it: (peer, start, stop); records of one hop can differ in
#: fields like free cache between lookups, so hops are compared by key
HopKey = tuple[PeerID, int, int]


def hop_key(o: SpanOption) -> HopKey:
    return (o.peer, o.start, o.stop)


@dataclass(frozen=True)
class Link:
    """An open session on ``hop``, pushing its outputs to ``next`` (None: to the client only)
    and taking its steps from ``prev`` (None: from the client)."""

    hop: SpanOption
    next: HopKey | None
    prev: PeerID | None = None


@dataclass(frozen=True)
class OpenHop:
    hop: SpanOption
    next: SpanOption | None
    prev: PeerID | None = None


@dataclass(frozen=True)
class Relink:
    hop: SpanOption
    next: SpanOption | None
    prev: PeerID | None = None


@dataclass(frozen=True)
class Flush:
    """Ask ``source`` (a kept hop ending at ``boundary``) for its unsent copies of ``steps``."""

    boundary: int
    source: SpanOption
    steps: tuple[int, ...]


@dataclass(frozen=True)
class Replay:
    """Run the stored inputs at ``hop.start`` for steps ``0..steps-1`` through ``hop``;
    ``store``: keep its outputs as the inputs at ``hop.stop`` (a later new hop needs them)."""

    hop: SpanOption
    steps: int
    store: bool


@dataclass(frozen=True)
class Missing:
    """Inputs at ``boundary`` the client does not hold and nobody alive can supply."""

    boundary: int
    steps: tuple[int, ...]
    source: SpanOption | None

    def describe(self) -> str:
        who = f"its source {self.source.describe()} is dead" if self.source is not None else "no hop produces them"
        return (f"no stored input of step {self.steps[0]} for block {self.boundary} and {who}: "
                "cannot replay")


@dataclass(frozen=True)
class RecoveryPlan:
    """Steps to move a session onto ``route``, in execution order: opens, relinks,
    flushes, replays, closes. ``missing`` set: the route cannot be rebuilt (nothing else is)."""

    route: tuple[SpanOption, ...]
    opens: tuple[OpenHop, ...] = ()
    relinks: tuple[Relink, ...] = ()
    flushes: tuple[Flush, ...] = ()
    replays: tuple[Replay, ...] = ()
    closes: tuple[SpanOption, ...] = ()
    missing: Missing | None = None

    @property
    def new_hops(self) -> tuple[SpanOption, ...]:
        return tuple(o.hop for o in reversed(self.opens))


def plan(
    old_route: Sequence[SpanOption],
    new_route: Sequence[SpanOption],
    links: Mapping[HopKey, Link],
    history: Mapping[int, Collection[int]],
    step: int,
    *,
    dead: Collection[PeerID] = (),
) -> RecoveryPlan:
    """How to move a session onto ``new_route`` before (re)running ``step``.

    ``old_route``: the hops whose cache holds steps ``0..step-1`` (the previous route, plus
    hops a partly executed plan finished replaying). ``links``: every hop with an open
    session, what it pushes to and whom it takes steps from (a hop whose link failed has
    none: it is relinked). ``history``: block boundary -> the steps whose input
    there the client holds. ``dead``: peers not to ask for anything (banned).
    """
    route = tuple(new_route)
    ready = {hop_key(o) for o in old_route}
    keys = [hop_key(o) for o in route]
    nexts: list[SpanOption | None] = [*route[1:], None]
    prevs: list[PeerID | None] = [None, *(o.peer for o in route[:-1])]

    opens = tuple(OpenHop(route[i], nexts[i], prevs[i]) for i in reversed(range(len(route)))
                  if keys[i] not in ready)
    relinks = []
    for i, o in enumerate(route):
        if keys[i] not in ready:
            continue
        nxt = nexts[i]
        want = hop_key(nxt) if nxt is not None else None
        link = links.get(keys[i])
        if link is None or link.next != want or link.prev != prevs[i]:
            relinks.append(Relink(o, nxt, prevs[i]))

    flushes: list[Flush] = []
    replays: list[Replay] = []
    missing: Missing | None = None
    produced: set[int] = set()       # boundaries a replay of this plan fills
    if step > 0:
        for i, o in enumerate(route):
            if keys[i] in ready:
                continue
            have = history.get(o.start, ())
            lacking = tuple(k for k in range(step) if k not in have)
            if lacking and o.start not in produced:
                source = route[i - 1] if i > 0 else None
                if source is None or source.peer in dead:
                    missing = missing or Missing(o.start, lacking, source)
                else:
                    flushes.append(Flush(o.start, source, lacking))
            last = i == len(route) - 1
            replays.append(Replay(o, step, store=not last))
            if not last:
                produced.add(o.stop)

    on_route = set(keys)
    closing: dict[HopKey, SpanOption] = {}
    for o in [*old_route, *(link.hop for link in links.values())]:
        k = hop_key(o)
        if k not in on_route and o.peer not in dead:
            closing.setdefault(k, o)

    if missing is not None:
        return RecoveryPlan(route, missing=missing)
    return RecoveryPlan(route, opens, tuple(relinks), tuple(flushes), tuple(replays),
                        tuple(closing.values()))
