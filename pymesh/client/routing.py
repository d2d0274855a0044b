"""Route choice: which workers a session runs through. Pure functions, no I/O.

A worker serves a whole span of blocks ``[start, stop)``; a route is a chain of
spans where each one starts where the previous one stopped, from the first block
the client needs to the last. The estimated latency of one decode step along a
route is the sum, per hop, of the measured round-trip time to that worker and its
announced compute time per block times the number of blocks. The cheapest route is
a shortest path over span boundaries (Dijkstra; every edge cost is positive).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping, Sequence

from pymesh.errors import PymeshError
from pymesh.proto.identity import PeerID
from pymesh.proto.vocab import Transport

#: RTT assumed for a worker we have not measured yet (milliseconds).
DEFAULT_RTT_MS = 5.0
#: Compute time assumed per block when a worker announces none (milliseconds).
DEFAULT_BLOCK_MS = 10.0


class NoRouteError(PymeshError):
    """No chain of reachable workers covers the requested blocks."""

    def __init__(self, message: str, missing_block: int | None) -> None:
        super().__init__(message)
        self.missing_block = missing_block


@dataclass(frozen=True)
class SpanOption:
    """One worker offering blocks ``[start, stop)``; what route choice needs of a record."""

    peer: PeerID
    start: int
    stop: int
    host: str = ""
    port: int = 0
    transports: tuple[Transport, ...] = (Transport.QUIC, Transport.TCP)
    block_ms: float = DEFAULT_BLOCK_MS
    cache_tokens_free: int = 1 << 30
    extra: Mapping[str, object] = field(default_factory=dict, compare=False, hash=False)

    @property
    def length(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        return f"{self.peer.short()}[{self.start}-{self.stop - 1}]"


def hop_model(option: SpanOption, default: str) -> str:
    """The model id ``option``'s worker announced (its quantization included), else ``default``."""
    model = option.extra.get("model")
    return model if isinstance(model, str) else default


def route_json(route: Sequence[SpanOption],
               path_of: Callable[[PeerID], str | None] | None = None) -> list[dict[str, object]]:
    """A route as reports show it: ``{"peer", "start", "stop"}`` per hop, plus ``path`` (how
    this client's connection reaches the worker: direct, punched or relayed) with ``path_of``."""
    out: list[dict[str, object]] = [{"peer": str(o.peer), "start": o.start, "stop": o.stop} for o in route]
    if path_of is not None:
        for hop, o in zip(out, route):
            hop["path"] = path_of(o.peer)
    return out


def providers_of(options: Sequence[SpanOption], block: int | None) -> set[PeerID]:
    """The peers of ``options`` serving ``block`` (none for no block)."""
    return {o.peer for o in options if block is not None and o.start <= block < o.stop}


def hop_cost_ms(option: SpanOption, rtt_ms: Mapping[PeerID, float], default_rtt_ms: float = DEFAULT_RTT_MS) -> float:
    """Estimated time one decode step spends on this hop (network + compute)."""
    block_ms = option.block_ms if option.block_ms > 0 else DEFAULT_BLOCK_MS
    return max(rtt_ms.get(option.peer, default_rtt_ms), 0.0) + block_ms * option.length


def usable_options(
    options: Sequence[SpanOption],
    start: int,
    stop: int,
    *,
    banned: Collection[PeerID] = (),
    min_cache_tokens: int = 0,
) -> list[SpanOption]:
    """Options lying inside ``[start, stop)``, not banned, with room for the session."""
    return [
        o
        for o in options
        if start <= o.start < o.stop <= stop
        and o.peer not in banned
        and o.cache_tokens_free >= min_cache_tokens
    ]


def first_uncovered_block(options: Sequence[SpanOption], start: int, stop: int) -> int | None:
    """The lowest block in ``[start, stop)`` that no chain of options starting at ``start`` reaches.

    ``None`` when ``stop`` is reachable. This is the block an error message should name.
    """
    reachable = {start}
    frontier = [start]
    while frontier:
        here = frontier.pop()
        for o in options:
            if o.start == here and o.stop <= stop and o.stop not in reachable:
                reachable.add(o.stop)
                frontier.append(o.stop)
    if stop in reachable:
        return None
    # The furthest reachable boundary is where the chain breaks.
    return max(b for b in reachable if b < stop)


def choose_route(
    options: Sequence[SpanOption],
    start: int,
    stop: int,
    *,
    rtt_ms: Mapping[PeerID, float] | None = None,
    banned: Collection[PeerID] = (),
    min_cache_tokens: int = 0,
    prefer: Collection[tuple[PeerID, int, int]] = (),
    default_rtt_ms: float = DEFAULT_RTT_MS,
    avoid_pairs: Collection[tuple[PeerID, PeerID]] = (),
    pair_penalty_ms: float = 60_000.0,
) -> list[SpanOption]:
    """The lowest-latency chain of spans covering ``[start, stop)``.

    ``prefer`` lists (peer, start, stop) hops that already hold a session: their RTT
    counts as zero, so recovery keeps the healthy part of a route. ``avoid_pairs`` lists
    (hop, successor) pairs that failed to link (the hop does not trust its successor's
    record): a route using one costs ``pair_penalty_ms`` more, so another route wins if
    there is one. Ties go to fewer hops, then to the lexicographically smaller peer IDs
    (deterministic). Raises :class:`NoRouteError` naming the first block nobody serves.
    """
    if not 0 <= start < stop:
        raise ValueError(f"empty or negative block range [{start}, {stop})")
    rtt = dict(rtt_ms or {})
    usable = usable_options(options, start, stop, banned=banned, min_cache_tokens=min_cache_tokens)
    by_start: dict[int, list[SpanOption]] = {}
    for o in usable:
        by_start.setdefault(o.start, []).append(o)
    preferred = set(prefer)
    pairs = {(a.key, b.key) for a, b in avoid_pairs}
    # Dijkstra over states (boundary, the hop ending there: only told apart when pairs
    # matter); the key is (cost, hops, tie-break) so results are stable.
    origin = (start, b"")
    best: dict[tuple[int, bytes], tuple[float, int]] = {origin: (0.0, 0)}
    back: dict[tuple[int, bytes], tuple[tuple[int, bytes], SpanOption]] = {}
    heap: list[tuple[float, int, int, bytes]] = [(0.0, 0, start, b"")]
    end: tuple[int, bytes] | None = None
    while heap:
        cost, hops, here, last = heapq.heappop(heap)
        state = (here, last)
        if best.get(state, (float("inf"), 0)) < (cost, hops):
            continue
        if here == stop:
            end = state
            break
        for o in sorted(by_start.get(here, ()), key=lambda o: (o.stop, o.peer.key)):
            c = hop_cost_ms(o, rtt, default_rtt_ms)
            if (o.peer, o.start, o.stop) in preferred:
                c -= rtt.get(o.peer, default_rtt_ms)
            if (last, o.peer.key) in pairs:
                c += pair_penalty_ms
            nxt = (o.stop, o.peer.key if pairs else b"")
            new = (cost + c, hops + 1)
            if new < best.get(nxt, (float("inf"), 0)):
                best[nxt] = new
                back[nxt] = (state, o)
                heapq.heappush(heap, (new[0], new[1], o.stop, nxt[1]))
    if end is None:
        missing = first_uncovered_block(usable, start, stop)
        everyone = first_uncovered_block(list(options), start, stop)
        if everyone is not None:
            msg = (
                f"no worker serves layer {everyone}: the swarm has no chain of workers covering "
                f"layers {start}-{stop - 1}; start a worker with --layers covering {everyone}"
            )
        else:
            msg = (
                f"no usable worker for layer {missing}: the workers serving it are banned after "
                "failures or have no free cache; wait and retry, or start another worker"
            )
        raise NoRouteError(msg, everyone if everyone is not None else missing)
    route: list[SpanOption] = []
    at = end
    while at != origin:
        at, o = back[at]
        route.append(o)
    route.reverse()
    return route


def route_cost_ms(route: Sequence[SpanOption], rtt_ms: Mapping[PeerID, float] | None = None) -> float:
    return sum(hop_cost_ms(o, rtt_ms or {}) for o in route)


def parse_chain(text: str, num_layers: int | None) -> tuple[int, int]:
    """``--chain 0,1,2,...`` (or ranges ``0-9,10-29``) -> the block range ``[start, stop)``.

    The layers must be distinct, ascending and contiguous (a pipeline runs blocks in
    order). Layers that do not exist in a model of ``num_layers`` blocks are named in
    the error at once.
    """
    layers: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        a, sep, b = part.partition("-")
        if not a.isdigit() or (sep and not b.isdigit()):
            raise ValueError(f"--chain {text!r}: {part!r} is not a layer number or range A-B")
        lo, hi = int(a), int(b) if sep else int(a)
        if hi < lo:
            raise ValueError(f"--chain {text!r}: range {part!r} runs backwards")
        layers.extend(range(lo, hi + 1))
    if not layers:
        raise ValueError(f"--chain {text!r} lists no layers")
    if num_layers is not None:
        bad = sorted({layer for layer in layers if layer >= num_layers})
        if bad:
            shown = _ranges(bad)
            raise ValueError(
                f"--chain lists layers that do not exist: {shown} (the model has {num_layers} "
                f"layers, 0-{num_layers - 1})"
            )
    if layers != list(range(layers[0], layers[0] + len(layers))):
        raise ValueError(
            f"--chain {text!r}: layers must be distinct, ascending and contiguous (blocks run in "
            "order through the pipeline)"
        )
    return layers[0], layers[-1] + 1


def _ranges(values: Sequence[int]) -> str:
    out: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(out)
