"""Probes a session sends its route while a step is late, and what their answers mean.

:func:`route_problem` runs while a step is in flight: every hop is asked for a sign of life
(``pm.info``) and whether its link to its next hop is alive (``pm.link``), at once. A hop
that does not answer is blamed first (a timeout); a hop that answers but whose link is down
blames the link, not the peer behind it; a hop that no longer holds the session has lost
it (restarted). :func:`stuck_hop` runs after the step timeout: the first hop whose counters
show it never processed the step. :func:`session_steps` asks one hop how far our session
got there (None: no session; an error: no answer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import trio

from pymesh.client.bans import BanCause
from pymesh.client.blame import Blame, Verdict
from pymesh.client.routing import SpanOption
from pymesh.errors import PymeshError
from pymesh.net.conn import RemoteError
from pymesh.proto import session_wire as sw

if TYPE_CHECKING:
    from pymesh.client.swarm import Swarm


def failure_of(o: SpanOption, what: str, exc: PymeshError) -> Blame:
    """The blame for a call to ``o`` that failed with ``exc``: a session it lost, an error
    it reported, or no answer at all."""
    if isinstance(exc, RemoteError):
        if exc.code == sw.ErrorCode.NOT_FOUND:
            return Blame(o.peer, f"{o.describe()} no longer holds the session ({what}: {exc})", Verdict.LOST)
        return Blame(o.peer, f"{what} failed on {o.describe()}: {exc}", cause=BanCause.FAILED)
    return Blame(o.peer, f"{what} failed on {o.describe()}: {exc}", cause=BanCause.UNREACHABLE)


async def route_problem(swarm: "Swarm", sid: bytes, route: Sequence[SpanOption], step: int,
                        timeout: float) -> Blame | None:
    """The first hop that does not answer, else the first other problem in route order
    (None: every hop and link answered). Silence comes first: a link to a silent hop is
    down because of that hop."""
    silent: dict[int, Blame] = {}
    found: dict[int, Blame] = {}

    async def probe(i: int, o: SpanOption) -> None:
        nxt = route[i + 1] if i + 1 < len(route) else None
        alive: list[bool] = []
        link: list[Blame | None] = []

        async def info() -> None:
            try:
                await swarm.request(o, sw.Info(), timeout=timeout)
                alive.append(True)
            except PymeshError:
                alive.append(False)

        async def check() -> None:
            try:
                meta, _ = await swarm.request(o, sw.CheckLink(sid), timeout=timeout)
                reply = sw.CheckLinkReply.from_meta_untrusted(meta)
            except RemoteError as exc:
                # not found: the hop restarted; another code: a worker without pm.link
                link.append(failure_of(o, "link check", exc) if exc.code == sw.ErrorCode.NOT_FOUND else None)
                return
            except PymeshError as exc:  # no answer (its check of the next hop may hang)
                reply = sw.CheckLinkReply(False, str(exc) or "no answer to the link check")
            if reply.ok or nxt is None:
                link.append(None)
            else:
                link.append(Blame(nxt.peer, f"link {o.describe()} -> {nxt.describe()} is down while step {step} "
                                            f"was in flight: {reply.detail}", Verdict.LINK, sender=o))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(info)
            nursery.start_soon(check)
        if not alive[0]:
            silent[i] = Blame(o.peer, f"{o.describe()} stopped answering while step {step} was in flight",
                              cause=BanCause.TIMEOUT)
        elif link[0] is not None:
            found[i] = link[0]

    async with trio.open_nursery() as nursery:
        for i, o in enumerate(route):
            nursery.start_soon(probe, i, o)
    for problems in (silent, found):
        if problems:
            return problems[min(problems)]
    return None


async def session_steps(swarm: "Swarm", sid: bytes, o: SpanOption, timeout: float) -> int | None:
    """How many steps of session ``sid`` hop ``o`` has done (None: it answered without the
    session); raises the PymeshError of a hop that does not answer."""
    try:
        meta, _ = await swarm.request(o, sw.Stats(sid), timeout=timeout)
        stats = sw.StatsReply.from_meta_untrusted(meta)
    except RemoteError as exc:
        if exc.code == sw.ErrorCode.NOT_FOUND:
            return None
        raise
    return None if stats.session is None else stats.session.steps


async def stuck_hop(swarm: "Swarm", sid: bytes, route: Sequence[SpanOption], step: int,
                    timeout: float) -> SpanOption:
    """The first hop that did not process ``step`` (or does not answer at all)."""
    for o in route:
        try:
            steps = await session_steps(swarm, sid, o, timeout)
        except PymeshError:
            return o
        if steps is None or steps <= step:
            return o
    return route[-1]
