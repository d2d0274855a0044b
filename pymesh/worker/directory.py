"""Where a session's next peer listens, according to that peer's own signed DHT record.

A client names the next hop as a peer id plus the span it must serve (``NextHop``); an
address in the request is only a hint. Peers may be hostile, so a worker never dials an
address only the request named: it looks the peer up among the verified records of its
model (the same records it reads for placement, cached briefly) and dials the address that
record announces. The hint may only pick which of the record's transports to use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol, Sequence

from pymesh.net.clock import Clock
from pymesh.proto.identity import PeerID
from pymesh.proto.records import WorkerRecord, base_model_id
from pymesh.proto.session_wire import NextHop
from pymesh.proto.vocab import Transport, WorkerState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NextAddr:
    """A verified address of the next hop: dial ``host:port`` over ``transport``, pinning ``peer``."""

    peer: PeerID
    host: str
    port: int
    transport: Transport

    def describe(self) -> str:
        return f"{self.peer.short()} at {self.host}:{self.port} over {self.transport}"


class PeerFilter(Protocol):
    """Which peers a worker deals with (``pymesh.proto.allowlist.PeerAllowlist`` fits)."""

    def allows(self, peer: PeerID) -> bool:
        ...


class NextHopResolver(Protocol):
    async def __call__(self, hop: NextHop) -> NextAddr | None:
        """The address ``hop.peer``'s verified record announces for its span, or ``None``."""
        ...


def address_from_record(rec: WorkerRecord, hop: NextHop, ours: Sequence[Transport],
                        model_id: str | None = None) -> NextAddr | None:
    """The address to dial for ``hop`` if ``rec`` is that peer's live record (of ``model_id``,
    when given, in any quantization) for a span that starts where the hop starts and covers it.

    The transport is one both sides speak: the hint's if the hint names the record's own
    host and port, else the first of ``ours`` the record lists. Pure.
    """
    if rec.peer_id != hop.peer or rec.state == WorkerState.OFFLINE:
        return None
    # any quantization of the model: a client routing with --allow-mixed chains them
    if model_id is not None and rec.base_id != base_model_id(model_id):
        return None
    if not rec.start == hop.start < hop.stop <= rec.stop:
        return None
    common = [t for t in ours if t.value in rec.transports]
    if not common:
        return None
    transport = common[0]
    h = hop.addr_hint
    if h is not None and (h.host, h.port) == (rec.host, rec.port) and h.transport in common:
        transport = h.transport
    return NextAddr(hop.peer, rec.host, rec.port, transport)


class RecordDirectory:
    """The model's verified records, read through the worker's DHT node and kept briefly.

    ``read`` returns the live, verified records of this worker's model (``DHTNode.
    find_model_records``). Placement reads with ``max_age=0``; next-hop lookups accept
    records up to ``max_age`` seconds old and re-read once on a miss, at most every
    ``min_refresh`` seconds (a stream of requests naming unknown peers cannot make the
    worker flood the DHT).
    """

    def __init__(self, read: Callable[[], Awaitable[list[WorkerRecord]]], clock: Clock,
                 transports: Sequence[Transport], *, max_age: float = 10.0, min_refresh: float = 1.0,
                 model_id: str | None = None) -> None:
        self._read = read
        self.model_id = model_id
        self.clock = clock
        self.transports = tuple(transports)
        self.max_age = max_age
        self.min_refresh = min_refresh
        self._records: list[WorkerRecord] = []
        self._read_at: float | None = None

    async def records(self, max_age: float | None = None) -> list[WorkerRecord]:
        """The records, re-read when the copy held is older than ``max_age`` (default: the cache's)."""
        limit = self.max_age if max_age is None else max_age
        now = self.clock.monotonic()
        if self._read_at is None or now - self._read_at >= limit:
            await self._refresh()
        return list(self._records)

    async def _refresh(self) -> None:
        recs = await self._read()
        self._records = list(recs)
        self._read_at = self.clock.monotonic()

    async def __call__(self, hop: NextHop) -> NextAddr | None:
        found = self._find(hop, await self.records())
        assert self._read_at is not None
        if found is None and self.clock.monotonic() - self._read_at >= self.min_refresh:
            await self._refresh()
            found = self._find(hop, self._records)
        return found

    def _find(self, hop: NextHop, recs: list[WorkerRecord]) -> NextAddr | None:
        for rec in recs:
            addr = address_from_record(rec, hop, self.transports, self.model_id)
            if addr is not None:
                return addr
        return None
