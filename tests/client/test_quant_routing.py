"""Quantizations in discovery and routing (issue 15), on trio's virtual clock with scripted
DHT reads: a route uses only workers of the client's own full model id, unless
--allow-mixed; a block only other quantizations serve fails with an error naming them and
what to pass; spot checkers and receipts are matched per hop's own id."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

import pytest
import trio
import trio.testing

from pymesh.client.discovery import RecordBook
from pymesh.client.receipt_check import Hop, StepFacts, _fields_problem
from pymesh.client.routing import NoRouteError, SpanOption, hop_model
from pymesh.client.shadow import alternative_route
from pymesh.client.swarm import Swarm
from pymesh.proto.records import WorkerRecord
from tests.client.sim import BOOT, FakeDHT, peer, record, settings

BASE = "tiny@0123456789ab"
Q8 = f"{BASE}:q8_0"
Q4 = f"{BASE}:q4_0"

pytestmark = pytest.mark.timeout(60)


class QuantSwarm(Swarm):
    def __init__(self, model_id: str, recs: list[WorkerRecord], **kw: Any) -> None:
        super().__init__(BOOT, model_id, **kw)
        self._dht = FakeDHT(lambda block: recs)  # type: ignore[assignment]

    async def measure_rtts(self, options: Sequence[SpanOption]) -> None:
        return None


def virtual(fn: Callable[[], Any]) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def rec(n: int, start: int, stop: int, model: str) -> WorkerRecord:
    return replace(record(n, start, stop), model_id=model)


MIXED = [rec(1, 0, 4, BASE), rec(2, 0, 4, Q8), rec(3, 4, 8, Q8), rec(4, 4, 8, BASE), rec(5, 0, 8, Q4),
         rec(6, 0, 8, "other@ba9876543210")]


def test_the_book_keeps_every_quantization_but_uses_only_its_own() -> None:
    book = RecordBook(Q8, lambda: 0.0, 300.0)
    book.merge(MIXED)
    assert {r.peer_id for r in book.live()} == {peer(2), peer(3)}
    assert {r.peer_id for r in book.others()} == {peer(1), peer(4), peer(5)}    # never another model's
    mixed = RecordBook(Q8, lambda: 0.0, 300.0, allow_mixed=True)
    mixed.merge(MIXED)
    assert {r.peer_id for r in mixed.live()} == {peer(n) for n in (1, 2, 3, 4, 5)}


@pytest.mark.parametrize(("model", "peers"), [(BASE, [1, 4]), (Q8, [2, 3]), (Q4, [5])])
def test_a_route_never_mixes_quantizations(model: str, peers: list[int]) -> None:
    async def main() -> None:
        s = QuantSwarm(model, MIXED, settings=settings())
        route = await s.find_route(0, 8)
        assert [o.peer for o in route] == [peer(n) for n in peers]
        assert {hop_model(o, "") for o in route} == {model}

    virtual(main)


def test_allow_mixed_routes_through_any_quantization() -> None:
    recs = [rec(1, 0, 4, BASE), rec(3, 4, 8, Q8)]

    async def main() -> None:
        s = QuantSwarm(BASE, recs, settings=settings(allow_mixed=True))
        route = await s.find_route(0, 8)
        assert [(o.peer, hop_model(o, "")) for o in route] == [(peer(1), BASE), (peer(3), Q8)]

    virtual(main)


def test_a_block_only_other_quantizations_serve_names_them_and_the_flags() -> None:
    recs = [rec(1, 0, 4, BASE), rec(3, 4, 8, Q8), rec(5, 4, 8, Q4), rec(7, 4, 8, Q8)]

    async def main() -> None:
        s = QuantSwarm(BASE, recs, settings=settings(discovery_timeout=5.0))
        with pytest.raises(NoRouteError) as info:
            await s.find_route(0, 8)
        msg = str(info.value)
        assert info.value.missing_block == 4
        assert "layer 4" in msg and "q4_0 (1 worker)" in msg and "q8_0 (2 workers)" in msg, msg
        assert "--quantize q4_0" in msg and "--quantize q8_0" in msg and "--allow-mixed" in msg, msg
        assert "GGUF" in msg and "float" in msg, msg

    virtual(main)


def test_a_quantized_client_is_told_to_drop_quantize_for_float_workers() -> None:
    async def main() -> None:
        s = QuantSwarm(Q4, [rec(1, 0, 8, BASE)], settings=settings(discovery_timeout=5.0))
        with pytest.raises(NoRouteError) as info:
            await s.find_route(0, 8)
        msg = str(info.value)
        assert "float (1 worker)" in msg and "no --quantize" in msg and "computes in q4_0" in msg, msg

    virtual(main)


def test_spot_checkers_share_the_checked_hops_quantization() -> None:
    recs = [rec(1, 0, 8, BASE), rec(2, 0, 8, Q8), rec(3, 0, 8, Q8)]

    async def main() -> None:
        s = QuantSwarm(BASE, recs, settings=settings(allow_mixed=True))
        got = await alternative_route(s, 0, 8, [peer(2)], 0, Q8)
        assert got is not None and [o.peer for o in got] == [peer(3)]
        assert await alternative_route(s, 0, 8, [peer(1)], 0, BASE) is None   # no float checker left

    virtual(main)


def test_receipts_are_matched_against_each_hops_own_id() -> None:
    facts = StepFacts(BASE, b"s" * 16, 1, 0, 1)
    assert _fields_problem(facts, Hop(peer(2), 0, 8, Q8), Q8, b"s" * 16, 1, 0, 1, 0, 8) is None
    assert _fields_problem(facts, Hop(peer(2), 0, 8, Q8), BASE, b"s" * 16, 1, 0, 1, 0, 8) is not None
    assert _fields_problem(facts, Hop(peer(1), 0, 8), Q8, b"s" * 16, 1, 0, 1, 0, 8) is not None
