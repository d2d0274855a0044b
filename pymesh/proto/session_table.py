"""The session protocol as a table: every ``pm.*`` message with its direction and wire fields.

docs/INTERFACES.md embeds :func:`render_markdown` (``scripts/gen_interfaces.py`` rewrites it)
and tests check both that the document is current and that each row's fields are exactly the
keys its class's ``to_meta()`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymesh.proto.session_wire import (
    CLOSE, ERR, FLUSH, FORWARD, INFO, LINK, OPEN, OUT, SET_NEXT, STATS, STEP, SESSION_COUNTERS, WORKER_COUNTERS,
    CheckLink, CheckLinkReply, Close, CloseReply, Empty, Err, Flush, FlushReply, Forward, ForwardReply, Info, InfoReply, Open,
    OpenReply, Out, SetNext, Stats, StatsReply, Step,
)

@dataclass(frozen=True)
class MessageSpec:
    """One row of the protocol table: ``fields`` are wire keys, ``?`` marks optional ones."""

    name: str            # the method or push topic
    kind: str            # "call", "reply" or "push"
    direction: str
    cls: type
    fields: tuple[str, ...]
    tensors: str


_NEXT = "next?{peer, start, stop, hint?{host, port, transport}}"
_STATS = (*WORKER_COUNTERS, "start", "stop", *(f"{k}?" for k in SESSION_COUNTERS))

MESSAGES: tuple[MessageSpec, ...] = (
    MessageSpec(INFO, "call", "client -> worker", Info, (), ""),
    MessageSpec(INFO, "reply", "worker -> client", InfoReply,
                ("peer", "model", "start", "stop", "version", "state", "free", "total", "sessions"), ""),
    MessageSpec(OPEN, "call", "client -> worker", Open,
                ("sid", "max_tokens", "batch?", "model?", "start?", "stop?", "reset?", "copies?", _NEXT, "prev?", "rcpt?"), ""),
    MessageSpec(OPEN, "reply", "worker -> client", OpenReply, ("start", "stop", "free"), ""),
    MessageSpec(SET_NEXT, "call", "client -> worker", SetNext, ("sid", _NEXT, "prev?"), ""),
    MessageSpec(SET_NEXT, "reply", "worker -> client", Empty, (), ""),
    MessageSpec(CLOSE, "call", "client -> worker", Close, ("sid",), ""),
    MessageSpec(CLOSE, "reply", "worker -> client", CloseReply, ("closed", "free"), ""),
    MessageSpec(FLUSH, "call", "client -> worker", Flush, ("sid",), ""),
    MessageSpec(FLUSH, "reply", "worker -> client", FlushReply, ("steps", "start", "stop"),
                "one output per step"),
    MessageSpec(FORWARD, "call", "client -> worker", Forward, ("sid", "step", "pos"), "hidden"),
    MessageSpec(FORWARD, "reply", "worker -> client", ForwardReply, ("rc?",), "output"),
    MessageSpec(LINK, "call", "client -> worker", CheckLink, ("sid",), ""),
    MessageSpec(LINK, "reply", "worker -> client", CheckLinkReply, ("ok", "detail"), ""),
    MessageSpec(STATS, "call", "client -> worker", Stats, ("sid?",), ""),
    MessageSpec(STATS, "reply", "worker -> client", StatsReply, _STATS, ""),
    MessageSpec(STEP, "push", "client or previous worker -> worker", Step, ("sid", "step", "pos", "rc?"), "hidden"),
    MessageSpec(OUT, "push", "worker -> client", Out, ("sid", "step", "steps", "final", "start", "stop", "rc?", "prc?"),
                "one output per step"),
    MessageSpec(ERR, "push", "worker -> client or previous worker", Err,
                ("sid", "step", "code", "msg", "start", "stop", "blame", "link?"), ""),
)


def render_markdown() -> str:
    """The table as Markdown (one row per call, reply or push)."""
    lines = ["| message | kind | direction | metadata fields (`?` optional) | tensors |",
             "|---|---|---|---|---|"]
    for m in MESSAGES:
        fields = ", ".join(m.fields) if m.fields else "-"
        lines.append(f"| `{m.name}` | {m.kind} | {m.direction} | {fields} | {m.tensors or '-'} |")
    return "\n".join(lines) + "\n"
