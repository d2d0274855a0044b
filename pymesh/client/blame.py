"""Who a failed step is held against, and what the session does about it. Pure, no I/O.

Three verdicts, each with its remedy:

- ``BAN``: the peer failed (timed out, was unreachable, reported an error on our session,
  or sent a wrong answer): it is banned and routed around (:mod:`pymesh.client.bans`).
- ``LINK``: a hop could not push the step to its successor. The connection between them
  failed, which does not prove the successor misbehaved (it may have restarted): nobody
  is banned; the hop is relinked (it re-dials) and the successor keeps its place if its
  session survived, else it is reopened and replayed, and only deprioritised.
- ``LOST``: the peer answers but no longer holds our session (a restarted worker, or an
  expired one): it is opened again and replayed, not banned.
- ``AVOID``: the peer refused a session (full, or not serving those blocks any more): it is
  routed around while others serve its blocks.
- ``PAIR``: a hop has no record it trusts of its successor (``next_unknown``: allowlists
  that differ between workers, a record not replicated yet), or refused the step its
  predecessor pushed because the receipt did not match the tensor (``bad_receipt``: one of
  the two lies, and nothing the client holds says which): routes avoid that (hop,
  successor) pair; neither worker is banned or avoided on other routes.
- ``CONVICTED``: verified inference proved the peer wrong (:mod:`pymesh.client.verify`); it
  is already banned for the client's life: the session routes around it.

:func:`judge_err` applies the session protocol's rule for ``pm.err`` pushes (issue 11):
only a hop of the session's route may report, and it may blame only itself or its own
successor on the route. Anything else is dropped, so a peer that once served the session
(or guessed its id) cannot get an honest hop banned.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Sequence

from pymesh.client.bans import BanCause
from pymesh.client.routing import SpanOption
from pymesh.errors import PymeshError
from pymesh.proto import session_wire as sw
from pymesh.proto.identity import PeerID

log = logging.getLogger(__name__)


class Verdict(enum.Enum):
    BAN = "ban"
    LINK = "link"
    LOST = "lost"
    AVOID = "avoid"
    PAIR = "pair"
    CONVICTED = "convicted"   # verification convicted the peer (banned for good already): route around it


@dataclass(frozen=True)
class Blame:
    """``peer`` is the one held responsible; for ``LINK`` and ``PAIR`` it is the successor
    behind the failed link and ``sender`` the hop whose push failed."""

    peer: PeerID
    why: str
    verdict: Verdict = Verdict.BAN
    cause: BanCause = BanCause.FAILED
    sender: SpanOption | None = None


class SessionFailed(PymeshError):
    """The session could not complete a step even after recovering (the message says why)."""


class StepFailure(Exception):
    """A step failed; ``blame`` says who is held responsible and what to do."""

    def __init__(self, blame: Blame) -> None:
        super().__init__(blame.why)
        self.blame = blame
        self.why = blame.why


def route_index(route: Sequence[SpanOption], peer: PeerID, start: int | None = None) -> int | None:
    """The position of ``peer``'s hop on ``route`` (the one starting at ``start`` if given)."""
    for i, o in enumerate(route):
        if o.peer == peer and (start is None or o.start == start):
            return i
    return None


def link_blame(hop: SpanOption, nxt: SpanOption | None, code: str, why: object) -> Blame | None:
    """What it means that ``hop`` answered pm.open / pm.set_next naming ``nxt`` with ``code``:
    a link failure, a pair to avoid, or None (the hop's own failure)."""
    if nxt is None:
        return None
    if code == sw.ErrorCode.NEXT_UNREACHABLE:
        return Blame(nxt.peer, f"{hop.describe()} cannot reach {nxt.describe()}: {why}", Verdict.LINK, sender=hop)
    if code == sw.ErrorCode.NEXT_UNKNOWN:
        return Blame(nxt.peer, f"{hop.describe()} does not know {nxt.describe()}: {why}", Verdict.PAIR, sender=hop)
    return None


def judge_err(route: Sequence[SpanOption], sender: PeerID, err: sw.Err) -> Blame | None:
    """What a ``pm.err`` from ``sender`` means for a session on ``route``; None: drop it."""
    i = route_index(route, sender, err.start)
    if i is None:
        log.debug("pm.err from %s dropped: not a hop of the session's route", sender.short())
        return None
    hop = route[i]
    successor = route[i + 1] if i + 1 < len(route) else None
    said = f"worker {hop.describe()} reported {err.code.value}: {err.msg}"
    if err.code == sw.ErrorCode.BAD_RECEIPT and i > 0 and err.blame == route[i - 1].peer:
        return Blame(hop.peer, f"{hop.describe()} refused what {route[i - 1].describe()} pushed: {err.msg}",
                     Verdict.PAIR, sender=route[i - 1])
    if err.blame is None or err.blame == sender:
        if err.code == sw.ErrorCode.NOT_FOUND:
            return Blame(sender, said, Verdict.LOST)
        return Blame(sender, said)
    if successor is None or err.blame != successor.peer:
        log.debug("pm.err from %s dropped: it blames %s, who is not its successor on the route",
                  sender.short(), err.blame.short())
        return None
    if err.code == sw.ErrorCode.NEXT_UNKNOWN:
        return Blame(successor.peer, f"{hop.describe()} does not know {successor.describe()}: {err.msg}",
                     Verdict.PAIR, sender=hop)
    if err.link or err.code == sw.ErrorCode.NEXT_UNREACHABLE:
        return Blame(successor.peer, f"link {hop.describe()} -> {successor.describe()} failed: {err.msg}",
                     Verdict.LINK, sender=hop)
    if err.code == sw.ErrorCode.NOT_FOUND:
        return Blame(successor.peer, said, Verdict.LOST)
    return Blame(successor.peer, said)
