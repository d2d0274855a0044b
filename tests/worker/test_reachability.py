"""Placement counts only reachable workers (issue 11, item 9): records are probed (pm.info at
the announced address) before they count as coverage; answers are cached and probes bounded."""

from __future__ import annotations

import socket

import pytest
import trio

from pymesh.net.clock import TrioClock
from pymesh.net.rpc import RpcNode
from pymesh.proto.identity import Identity
from pymesh.proto.records import WorkerRecord
from pymesh.proto.vocab import Transport
from pymesh.worker.directory import RecordDirectory
from pymesh.worker.reachability import ReachabilityCache
from pymesh.worker.runtime import load_runtime
from pymesh.worker.server import Worker, WorkerOptions
from pymesh.worker.service import WorkerService
from pymesh.worker.sessions import SessionTable
from tests.net.helpers import fast_config
from tests.worker.harness import enter, run

pytestmark = pytest.mark.timeout(60)


def _rec(who: Identity, start: int, *, port: int = 4000, ts: float = 1.0, tps: float = 10.0) -> WorkerRecord:
    return WorkerRecord(model_id="echo", start=start, stop=start + 2, host="127.0.0.1", port=port,
                        transports=("tcp",), state="online", tokens_per_s=tps).signed(who, timestamp=ts)


def test_answers_are_cached_and_probes_bounded() -> None:
    honest, fake = Identity.generate(), Identity.generate()
    crowd = [Identity.generate() for _ in range(40)]

    async def probe(rec: WorkerRecord) -> bool:
        if rec.peer_id == honest.peer_id:
            return True
        await trio.sleep_forever()      # a fake record's address: nothing answers
        return False

    async def main() -> None:
        cache = ReachabilityCache(probe, TrioClock(), ttl=300, max_probes=16, timeout=3)
        t0 = trio.current_time()
        got = await cache.reachable([_rec(honest, 0), _rec(fake, 2)])
        assert [r.peer_id for r in got.records] == [honest.peer_id] and got.unknown == 0
        assert trio.current_time() - t0 <= 3.5 and cache.probes == 2   # probed at once, each bounded
        # the same records, and the honest one re-signed by its heartbeat: nothing probed again
        got = await cache.reachable([_rec(honest, 0, ts=2.0), _rec(fake, 2)])
        assert [r.peer_id for r in got.records] == [honest.peer_id] and cache.probes == 2
        # a new record of the fake peer (a restart, say) is probed again
        await cache.reachable([_rec(fake, 2, ts=3.0)])
        assert cache.probes == 3
        # a flood of records: at most max_probes per round, the rest not counted
        flood = [_rec(c, 0, port=5000 + i) for i, c in enumerate(crowd)]
        got = await cache.reachable([*flood, _rec(honest, 0, ts=4.0)])
        assert cache.probes == 3 + 16 and got.unknown == 24
        assert [r.peer_id for r in got.records] == [honest.peer_id]
        # after the ttl everything is probed again
        await trio.sleep(301)
        await cache.reachable([_rec(honest, 0, ts=4.0)])
        assert cache.probes == 3 + 16 + 1

    run(main)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def test_a_record_pointing_nowhere_creates_no_coverage() -> None:
    """A fast fake record on blocks 0-1 (nothing listens at its address) and an honest worker on
    2-3: a joining 2-block worker must take the gap 0-1 (before: it took 2-3, the fake's
    coverage hiding the gap), and a running worker sees the gap (it moves to cover it)."""
    honest_id, fake_id = Identity.generate(), Identity.generate()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            hnode = RpcNode(honest_id, transport="tcp", config=fast_config())
            await nursery.start(enter, hnode)
            svc = WorkerService(load_runtime(None, 2, 4, device="cpu", dtype_name="float32"),
                                SessionTable(1000, 300), model_id="echo", peer=honest_id.peer_id,
                                dial=None, resolve_next=None, hidden_size=None)  # type: ignore[arg-type]
            svc.register(hnode)
            port = await hnode.listen("127.0.0.1", 0)
            served = [_rec(honest_id, 2, port=port), _rec(fake_id, 0, port=_closed_port(), tps=1000.0)]

            async def read() -> list[WorkerRecord]:
                return served

            w = Worker(WorkerOptions(bootstrap=[], transport="tcp", num_layers=4, max_blocks=2))
            w.nodes[Transport.TCP] = RpcNode(w.identity, transport="tcp", config=fast_config())
            await nursery.start(enter, w.nodes[Transport.TCP])
            w.directory = RecordDirectory(read, TrioClock(), (Transport.TCP,), model_id=w.model_id)
            assert await w._choose_span() == (0, 2)
            assert w.reachability.probes == 2
            from pymesh.worker import placement

            decision = await w._move_decision(placement.Announced(2, 4, 10.0))
            assert decision.move and decision.new_start == 0, decision
            assert w.reachability.probes == 2          # cached: nothing probed again
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_no_move_while_records_are_left_unprobed() -> None:
    """A move drops sessions: with records left unprobed by the per-round bound, the worker
    does not act on the partial picture (the next rounds probe the rest)."""
    from pymesh.worker import placement

    ids = [Identity.generate() for _ in range(3)]
    served = [_rec(i, 2) for i in ids]        # blocks 0-1 uncovered: a move would cover them

    async def read() -> list[WorkerRecord]:
        return served

    async def probe(rec: WorkerRecord) -> bool:
        return True

    async def main() -> None:
        w = Worker(WorkerOptions(bootstrap=[], transport="tcp", num_layers=4, max_blocks=2))
        w.directory = RecordDirectory(read, TrioClock(), (Transport.TCP,), model_id=w.model_id)
        w.reachability = ReachabilityCache(probe, TrioClock(), max_probes=2)
        mine = placement.Announced(2, 4, 10.0)
        first = await w._move_decision(mine)
        assert not first.move and "not probed" in first.reason
        second = await w._move_decision(mine)   # the rest probed now
        assert second.move and second.new_start == 0

    run(main)
