"""Next-hop resolution: only an address the peer's own verified record announces is dialled."""

from __future__ import annotations

import trio

from pymesh.net.clock import FakeClock
from pymesh.proto.identity import Identity
from pymesh.proto.records import WorkerRecord
from pymesh.proto.session_wire import AddrHint, NextHop
from pymesh.proto.vocab import Transport
from pymesh.worker.directory import NextAddr, RecordDirectory, address_from_record

ALICE, MALLORY = Identity.from_seed(b"a" * 32), Identity.from_seed(b"m" * 32)


def _rec(who: Identity, start: int, stop: int, *, host: str = "10.0.0.2", port: int = 4000,
         transports: tuple[str, ...] = ("quic", "tcp"), state: str = "online") -> WorkerRecord:
    return WorkerRecord(model_id="m", start=start, stop=stop, host=host, port=port, transports=transports,
                        state=state).signed(who)


def test_the_record_decides_the_address_and_the_hint_only_the_transport() -> None:
    rec = _rec(ALICE, 2, 6)
    both = (Transport.QUIC, Transport.TCP)
    hop = NextHop(ALICE.peer_id, 2, 6)
    assert address_from_record(rec, hop, both) == NextAddr(ALICE.peer_id, "10.0.0.2", 4000, Transport.QUIC)
    # A hint matching the record's address picks its transport...
    tcp_hint = NextHop(ALICE.peer_id, 2, 6, AddrHint("10.0.0.2", 4000, Transport.TCP))
    assert address_from_record(rec, tcp_hint, both) == NextAddr(ALICE.peer_id, "10.0.0.2", 4000, Transport.TCP)
    # ...a hint elsewhere (a victim's address, say) changes nothing.
    evil = NextHop(ALICE.peer_id, 2, 6, AddrHint("192.0.2.7", 53, Transport.TCP))
    assert address_from_record(rec, evil, both) == NextAddr(ALICE.peer_id, "10.0.0.2", 4000, Transport.QUIC)


def test_records_that_do_not_vouch_for_the_hop_are_not_used() -> None:
    both = (Transport.QUIC, Transport.TCP)
    hop = NextHop(ALICE.peer_id, 2, 6)
    assert address_from_record(_rec(MALLORY, 2, 6), hop, both) is None           # another peer's record
    assert address_from_record(_rec(ALICE, 3, 6), hop, both) is None             # does not cover the span
    assert address_from_record(_rec(ALICE, 2, 6, state="offline"), hop, both) is None
    assert address_from_record(_rec(ALICE, 2, 6, transports=("tcp",)), hop, (Transport.QUIC,)) is None
    assert address_from_record(_rec(ALICE, 2, 8), hop, both) is not None         # a longer span serves it
    assert address_from_record(_rec(ALICE, 0, 8), hop, both) is None             # one starting earlier does not
    assert address_from_record(_rec(ALICE, 2, 6), hop, both, "other-model") is None   # another model's record


def test_directory_caches_and_rereads_once_on_a_miss() -> None:
    clock = FakeClock()
    served: list[list[WorkerRecord]] = [[_rec(MALLORY, 0, 2)], [_rec(MALLORY, 0, 2), _rec(ALICE, 2, 6)]]
    reads: list[int] = []

    async def read() -> list[WorkerRecord]:
        reads.append(1)
        return served[min(len(reads), len(served)) - 1]

    async def main() -> None:
        d = RecordDirectory(read, clock, (Transport.QUIC,), max_age=10, min_refresh=1)
        hop = NextHop(ALICE.peer_id, 2, 6)
        assert await d(hop) is None and len(reads) == 1          # first read; a miss right after it
        clock.advance(2)
        assert await d(hop) == NextAddr(ALICE.peer_id, "10.0.0.2", 4000, Transport.QUIC)
        assert len(reads) == 2                                    # the miss re-read once
        assert await d(hop) is not None and len(reads) == 2      # served from the cache
        unknown = NextHop(Identity.from_seed(b"z" * 32).peer_id, 2, 6)
        for _ in range(5):                                        # a flood of unknown peers: no flood of reads
            assert await d(unknown) is None
        assert len(reads) == 2
        await d.records(max_age=0)                                # placement always reads fresh
        assert len(reads) == 3

    trio.run(main)
