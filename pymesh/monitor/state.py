"""The monitor's state: a pure snapshot of the swarm plus what changed since the last poll.

Nothing here does I/O or reads the clock: :func:`update` takes the records a poll
returned, the measured round-trip times and ``now``, and returns the next
:class:`MonitorState` with the events (joined, left, moved span, changed state) found
by diffing against the previous one. The view (:mod:`pymesh.monitor.view`) is a pure
function of this object, so both are tested without a network.

Records are read by attribute (``peer_id``, ``model_id``, ``start``, ``stop``, ``host``,
``port``, ``transports``, ``state``, ``tokens_per_s``, ``block_ms``,
``cache_tokens_free``, ``cache_tokens_total``, ``sessions``, ``timestamp``), the fields
of :class:`pymesh.proto.records.WorkerRecord`.

**Flagged** workers are the ones on a client blocklist (``--blocklist``: convicted of wrong
answers by verified inference); the state maps their peer text to the reason, escaped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Protocol

from pymesh.errors import DecodeError
from pymesh.monitor.text import printable
from pymesh.proto.records import MAX_BLOCKS, base_model_id, split_model_id
from pymesh.proto.vocab import WorkerState

#: How many events the state keeps (the view shows the newest few).
MAX_EVENTS = 200
#: MAX_BLOCKS (from proto.records, which rejects records past it): a record whose span
#: ends beyond it, or beyond a block count given with ``--blocks``, is not a worker of any
#: real model and is ignored, so one record cannot make a million-cell coverage map.
#: Cut lengths for the text fields a record's signer chooses (see pymesh.monitor.text).
MAX_MODEL_ID_SHOWN = 120
MAX_HOST_SHOWN = 64
MAX_TRANSPORT_SHOWN = 16
MAX_TRANSPORTS_SHOWN = 4
#: cut length of a flagged worker's reason (from the blocklist file, which anyone may edit)
MAX_FLAG_SHOWN = 160


class RecordLike(Protocol):
    """The fields of a worker record the monitor reads (read-only, so frozen dataclasses fit)."""

    @property
    def peer_id(self) -> Any: ...

    @property
    def model_id(self) -> str: ...

    @property
    def start(self) -> int: ...

    @property
    def stop(self) -> int: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def transports(self) -> tuple[str, ...]: ...

    @property
    def state(self) -> str: ...

    @property
    def block_ms(self) -> float: ...

    @property
    def tokens_per_s(self) -> float: ...

    @property
    def cache_tokens_free(self) -> int: ...

    @property
    def cache_tokens_total(self) -> int: ...

    @property
    def sessions(self) -> int: ...

    @property
    def timestamp(self) -> float: ...


def peer_text(peer_id: Any) -> str:
    """The full text form of a peer ID (a ``PeerID`` or already a string)."""
    to_text = getattr(peer_id, "to_text", None)
    return to_text() if callable(to_text) else str(peer_id)


@dataclass(frozen=True)
class WorkerView:
    """One worker as the monitor shows it (plain values, no network objects)."""

    peer: str                       # full peer ID text
    model_id: str
    start: int
    stop: int                       # blocks [start, stop)
    host: str
    port: int
    transports: tuple[str, ...]    # as announced (a transport this monitor does not know stays a string)
    state: WorkerState
    tokens_per_s: float
    block_ms: float
    sessions: int
    cache_tokens_free: int
    cache_tokens_total: int
    timestamp: float
    rtt_ms: float | None = None     # measured by the monitor; None = not measured / no answer
    #: how the worker is reached: "direct", "punch" (behind NAT, hole punching) or "relay"
    reach: str = "direct"

    @property
    def short(self) -> str:
        return self.peer[:10]

    @property
    def peer_id(self) -> str:
        """So a view can stand in for a record (the last known state after a failed poll)."""
        return self.peer

    @property
    def live(self) -> bool:
        return self.state != WorkerState.OFFLINE

    @property
    def quant(self) -> str | None:
        """The block format the worker computes in (its model id's suffix); None: float."""
        return split_model_id(self.model_id)[1]

    @property
    def model_label(self) -> str:
        """The model cell: the name, plus the quantization (``smollm2 q4_1``) when there is one."""
        name = self.model_id.split("@", 1)[0]
        return name if self.quant is None else f"{name} {self.quant}"

    def span_text(self) -> str:
        """The span as the command line writes it: inclusive ``A-B``."""
        if self.stop <= self.start:
            return "-"
        return f"{self.start}-{self.stop - 1}"

    @classmethod
    def from_record(cls, record: RecordLike, rtt_ms: float | None = None) -> "WorkerView":
        """The view of a record; its free-text fields are escaped and cut (pymesh.monitor.text)."""
        return cls(
            peer=printable(peer_text(record.peer_id), 64),
            model_id=printable(record.model_id, MAX_MODEL_ID_SHOWN),
            start=int(record.start),
            stop=int(record.stop),
            host=printable(record.host, MAX_HOST_SHOWN),
            port=int(record.port),
            transports=tuple(printable(t, MAX_TRANSPORT_SHOWN)
                             for t in tuple(record.transports)[:MAX_TRANSPORTS_SHOWN]),
            state=WorkerState.parse_untrusted(str(record.state)),
            tokens_per_s=float(record.tokens_per_s),
            block_ms=float(record.block_ms),
            sessions=int(record.sessions),
            cache_tokens_free=int(record.cache_tokens_free),
            cache_tokens_total=int(record.cache_tokens_total),
            timestamp=float(record.timestamp),
            rtt_ms=rtt_ms,
            reach=_reach_mode(getattr(record, "reach", None)),
        )


@dataclass(frozen=True)
class Event:
    """Something that changed between two polls."""

    time: float
    kind: str                       # "joined" | "left" | "moved" | "state"
    peer: str                       # full peer ID text
    model_id: str
    text: str                       # human-readable detail

    @property
    def short(self) -> str:
        return self.peer[:10]


@dataclass(frozen=True)
class MonitorState:
    """Everything the view needs. Build the first with ``MonitorState(bootstrap=...)``."""

    bootstrap: str = ""
    bootstrap_ok: bool | None = None        # None = not checked yet
    now: float = 0.0
    polls: int = 0
    workers: tuple[WorkerView, ...] = ()
    #: model id -> number of blocks (the largest ``stop`` ever seen, or a given hint),
    #: kept after the workers leave so a vanished tail still shows as a gap.
    model_blocks: Mapping[str, int] = field(default_factory=dict)
    events: tuple[Event, ...] = ()
    error: str | None = None                # last poll failure, shown in the header
    model_filter: str | None = None
    #: text peer IDs of ``--allow-peers`` (None: an open swarm, every signer is shown)
    allow_peers: frozenset[str] | None = None
    #: records of the last poll that were not shown: unlisted signer, impossible span
    ignored: int = 0
    #: peer text -> why, for the workers on the blocklist (escaped and cut)
    flagged: Mapping[str, str] = field(default_factory=dict)

    # ---- derived values the view uses ---------------------------------------------
    def models(self) -> list[str]:
        names = set(self.model_blocks) | {w.model_id for w in self.workers}
        if self.model_filter is not None:
            names = {n for n in names if _model_matches(n, self.model_filter)}
        return sorted(names)

    def workers_of(self, model_id: str) -> list[WorkerView]:
        return sorted(
            (w for w in self.workers if w.model_id == model_id),
            key=lambda w: (w.start, w.stop, w.peer),
        )

    def live_workers(self) -> list[WorkerView]:
        return [w for w in self.workers if w.live]

    def total_tokens_per_s(self, model_id: str | None = None) -> float:
        """Sum of announced span throughput of live workers (optionally of one model)."""
        return sum(
            w.tokens_per_s for w in self.live_workers() if model_id is None or w.model_id == model_id
        )

    def block_throughput(self, model_id: str) -> list[float]:
        """Per block: the summed tokens/s of the live workers serving it (0.0 = gap)."""
        n = self.model_blocks.get(model_id, 0)
        n = min(MAX_BLOCKS, max([n] + [w.stop for w in self.workers if w.model_id == model_id]))
        cover = [0.0] * n
        for w in self.live_workers():
            if w.model_id != model_id:
                continue
            for b in range(max(0, w.start), min(n, w.stop)):
                # A worker announcing 0 tokens/s still serves the block: count it as a
                # sliver so the block is not shown as a gap.
                cover[b] += max(w.tokens_per_s, 1e-6)
        return cover

    def gaps(self, model_id: str) -> list[tuple[int, int]]:
        """Inclusive block ranges nobody live serves."""
        out: list[tuple[int, int]] = []
        start: int | None = None
        cover = self.block_throughput(model_id)
        for b, tps in enumerate(cover + [1.0]):
            if tps <= 0.0 and start is None:
                start = b
            elif tps > 0.0 and start is not None:
                out.append((start, b - 1))
                start = None
        return out

    def recent_events(self, n: int) -> list[Event]:
        return list(self.events[-n:])

    def flag_of(self, w: WorkerView) -> str | None:
        """Why ``w`` is on the blocklist (None: it is not)."""
        return self.flagged.get(w.peer)

    def flagged_workers(self) -> list[WorkerView]:
        return [w for w in self.workers if w.peer in self.flagged]


def _model_matches(model_id: str, wanted: str) -> bool:
    """``--model NAME`` matches ``NAME`` exactly, ``NAME@<fingerprint>`` in every quantization,
    or a base id ``NAME@<fingerprint>`` in every quantization."""
    return model_id == wanted or model_id.split("@", 1)[0] == wanted or base_model_id(model_id) == wanted


def update(
    state: MonitorState,
    records: Iterable[RecordLike],
    *,
    now: float,
    rtts_ms: Mapping[str, float | None] | None = None,
    bootstrap_ok: bool | None = None,
    error: str | None = None,
    model_blocks: Mapping[str, int] | None = None,
    flagged: Mapping[str, str] | None = None,
) -> MonitorState:
    """The next state after a poll: new worker list, events found by diffing.

    ``records`` are what the DHT returned (several per peer are reduced to the newest);
    ``rtts_ms`` maps a peer's text ID to its measured round trip (peers not in it keep
    the previous measurement); ``model_blocks`` are known block counts (e.g. from a
    model's config), keyed by model id or bare name, that override the "largest stop
    seen" estimate; ``flagged`` maps the peer text of blocklisted workers to the reason
    (None: the previous map is kept).
    """
    rtts = dict(rtts_ms or {})
    newest: dict[str, RecordLike] = {}
    ignored = 0
    for rec in records:
        key = peer_text(rec.peer_id)
        if state.model_filter is not None and not _model_matches(str(rec.model_id), state.model_filter):
            continue
        if not admissible(state, rec, model_blocks):
            ignored += 1
            continue
        old = newest.get(key)
        if old is None or float(rec.timestamp) >= float(old.timestamp):
            newest[key] = rec
    previous = {w.peer: w for w in state.workers}
    workers: list[WorkerView] = []
    for key, rec in newest.items():
        rtt = rtts[key] if key in rtts else (previous[key].rtt_ms if key in previous else None)
        try:
            workers.append(WorkerView.from_record(rec, rtt))
        except DecodeError:  # a state this monitor does not know: not shown
            continue
    workers.sort(key=lambda w: (w.model_id, w.start, w.stop, w.peer))

    blocks = dict(state.model_blocks)
    for w in workers:
        blocks[w.model_id] = max(blocks.get(w.model_id, 0), w.stop)
    for name, n in (model_blocks or {}).items():
        matching = [m for m in blocks if _model_matches(m, name)] or [name]
        for m in matching:
            blocks[m] = int(n)

    flags = state.flagged if flagged is None else {
        peer_text(p): printable(why, MAX_FLAG_SHOWN) for p, why in flagged.items()}
    events = deque(state.events, maxlen=MAX_EVENTS)
    if state.polls > 0:
        events.extend(diff_events(previous, {w.peer: w for w in workers}, now))
    else:
        # First poll: everyone present "joined" as far as this monitor knows.
        events.extend(
            Event(now, "joined", w.peer, w.model_id, f"serves {w.span_text()} ({w.state})")
            for w in workers
            if w.live
        )
    events.extend(Event(now, "flagged", w.peer, w.model_id, f"on the blocklist: {flags[w.peer]}")
                  for w in workers if w.peer in flags and (w.peer not in state.flagged or w.peer not in previous))
    return replace(
        state,
        now=now,
        polls=state.polls + 1,
        workers=tuple(workers),
        model_blocks=blocks,
        events=tuple(events),
        bootstrap_ok=state.bootstrap_ok if bootstrap_ok is None else bootstrap_ok,
        error=error,
        ignored=ignored,
        flagged=flags,
    )


def admissible(state: MonitorState, record: RecordLike, model_blocks: Mapping[str, int] | None = None) -> bool:
    """Whether the monitor shows (and pings) ``record``: its signer is on the allowlist, if
    there is one, and its span lies inside the model: ``0 <= start < stop <= blocks``
    (``--blocks`` when given for this model, else :data:`MAX_BLOCKS`)."""
    if state.allow_peers is not None and peer_text(record.peer_id) not in state.allow_peers:
        return False
    limit = MAX_BLOCKS
    for name, n in (model_blocks or {}).items():
        if _model_matches(str(record.model_id), name):
            limit = min(limit, int(n))
    start, stop = int(record.start), int(record.stop)
    return 0 <= start < stop <= limit


def diff_events(
    before: Mapping[str, WorkerView], after: Mapping[str, WorkerView], now: float
) -> list[Event]:
    """Events between two polls, in a stable order (by peer)."""
    out: list[Event] = []
    for peer in sorted(set(before) | set(after)):
        old, new = before.get(peer), after.get(peer)
        if new is not None and new.live and (old is None or not old.live):
            out.append(Event(now, "joined", peer, new.model_id, f"serves {new.span_text()} ({new.state})"))
        elif old is not None and old.live and (new is None or not new.live):
            why = "announced offline" if new is not None else "record expired"
            out.append(Event(now, "left", peer, old.model_id, f"{old.span_text()}: {why}"))
        elif old is not None and new is not None and new.live:
            if (old.start, old.stop, old.model_id) != (new.start, new.stop, new.model_id):
                out.append(
                    Event(now, "moved", peer, new.model_id, f"{old.span_text()} -> {new.span_text()}")
                )
            elif old.state != new.state:
                out.append(Event(now, "state", peer, new.model_id, f"{old.state} -> {new.state}"))
    return out



def snapshot(state: MonitorState) -> dict[str, Any]:
    """The state as plain JSON-ready data (``pymesh monitor --once --json``)."""
    models = {}
    for m in state.models():
        cover = state.block_throughput(m)
        models[m] = {
            "blocks": len(cover),
            "gaps": [list(g) for g in state.gaps(m)],
            "bottleneck_tokens_per_s": min(cover) if cover else 0.0,
            "live_workers": sum(1 for w in state.workers_of(m) if w.live),
        }
    return {
        "bootstrap": state.bootstrap,
        "bootstrap_ok": state.bootstrap_ok,
        "time": state.now,
        "error": state.error,
        "models": models,
        "workers": [
            {
                "peer": w.peer, "model": w.model_id, "start": w.start, "stop": w.stop,
                "host": w.host, "port": w.port, "transports": list(w.transports), "state": w.state,
                "tokens_per_s": w.tokens_per_s, "block_ms": w.block_ms, "sessions": w.sessions,
                "cache_tokens_free": w.cache_tokens_free, "cache_tokens_total": w.cache_tokens_total,
                "rtt_ms": w.rtt_ms, "age_s": max(0.0, state.now - w.timestamp) if w.timestamp else None,
                "flagged": state.flag_of(w),
            }
            for m in state.models() for w in state.workers_of(m)
        ],
        "events": [{"time": e.time, "kind": e.kind, "peer": e.peer, "model": e.model_id, "text": e.text}
                   for e in state.events],
    }


def _reach_mode(reach: object) -> str:
    """A record's ``reach`` as a word (records are verified; anything else reads as direct)."""
    mode = getattr(reach, "mode", None)
    return mode if mode in ("punch", "relay") else "direct"
