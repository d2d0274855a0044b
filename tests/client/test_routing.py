"""Route choice over span boundaries (pure)."""

from __future__ import annotations

import pytest

from pymesh.client.routing import NoRouteError, SpanOption, choose_route, parse_chain, route_cost_ms
from pymesh.proto.identity import PeerID


def pid(n: int) -> PeerID:
    return PeerID(bytes([n]) * 32)


def opt(n: int, start: int, stop: int, block_ms: float = 1.0, free: int = 1000) -> SpanOption:
    return SpanOption(pid(n), start, stop, block_ms=block_ms, cache_tokens_free=free)


def test_single_chain_is_found_in_order() -> None:
    opts = [opt(3, 20, 30), opt(1, 0, 10), opt(2, 10, 20)]
    route = choose_route(opts, 0, 30)
    assert [(o.start, o.stop) for o in route] == [(0, 10), (10, 20), (20, 30)]


def test_faster_worker_wins_and_rtt_counts() -> None:
    slow, fast = opt(1, 0, 10, block_ms=5.0), opt(2, 0, 10, block_ms=1.0)
    assert choose_route([slow, fast], 0, 10)[0].peer == pid(2)
    # A large measured RTT to the fast one tips the balance (10*1 + 100 > 10*5 + 1).
    route = choose_route([slow, fast], 0, 10, rtt_ms={pid(1): 1.0, pid(2): 100.0})
    assert route[0].peer == pid(1)


def test_one_long_span_beats_two_hops_when_cheaper() -> None:
    opts = [opt(1, 0, 10), opt(2, 10, 20), opt(3, 0, 20)]
    route = choose_route(opts, 0, 20, rtt_ms={pid(1): 5, pid(2): 5, pid(3): 5})
    assert [o.peer for o in route] == [pid(3)]
    # Dijkstra, not greedy: a cheap first hop that leads to an expensive second one loses.
    opts = [opt(1, 0, 5, block_ms=0.1), opt(2, 5, 20, block_ms=50), opt(3, 0, 20, block_ms=2)]
    assert [o.peer for o in choose_route(opts, 0, 20)] == [pid(3)]
    assert route_cost_ms(choose_route(opts, 0, 20)) == pytest.approx(5 + 40)


def test_banned_and_full_workers_are_skipped() -> None:
    opts = [opt(1, 0, 10), opt(2, 0, 10, free=5), opt(3, 0, 10, block_ms=9)]
    route = choose_route(opts, 0, 10, banned={pid(1)}, min_cache_tokens=10)
    assert route[0].peer == pid(3)


def test_missing_layer_is_named() -> None:
    opts = [opt(1, 0, 10), opt(2, 10, 20), opt(4, 25, 30)]
    with pytest.raises(NoRouteError) as info:
        choose_route(opts, 0, 30)
    assert info.value.missing_block == 20
    assert "layer 20" in str(info.value)


def test_banned_only_provider_says_banned() -> None:
    opts = [opt(1, 0, 10), opt(2, 10, 20)]
    with pytest.raises(NoRouteError) as info:
        choose_route(opts, 0, 20, banned={pid(2)})
    assert info.value.missing_block == 10
    assert "banned" in str(info.value)


def test_preferred_hops_are_kept_on_recovery() -> None:
    opts = [opt(1, 0, 10), opt(5, 0, 10), opt(3, 10, 20)]
    route = choose_route(opts, 0, 20, rtt_ms={pid(1): 3, pid(5): 1}, prefer={(pid(1), 0, 10)})
    assert route[0].peer == pid(1)


def test_parse_chain() -> None:
    assert parse_chain("0,1,2,3", 16) == (0, 4)
    assert parse_chain("0-9,10-15", 16) == (0, 16)
    assert parse_chain("4,5,6", None) == (4, 7)
    with pytest.raises(ValueError, match="do not exist: 16-23"):
        parse_chain(",".join(str(i) for i in range(24)), 16)
    with pytest.raises(ValueError, match="contiguous"):
        parse_chain("0,2", 16)
    with pytest.raises(ValueError, match="not a layer"):
        parse_chain("a,b", 16)


def test_an_avoided_pair_costs_more_but_each_of_its_workers_stays_usable() -> None:
    a, b, b2, c = opt(1, 0, 10), opt(2, 10, 20, block_ms=1.0), opt(3, 10, 20, block_ms=3.0), opt(4, 20, 30)
    a2 = opt(5, 0, 10, block_ms=2.0)
    assert [o.peer for o in choose_route([a, b, b2, c], 0, 30)] == [pid(1), pid(2), pid(4)]
    # 1 -> 2 is avoided: the slower middle worker is used after 1 ...
    route = choose_route([a, b, b2, c], 0, 30, avoid_pairs={(pid(1), pid(2))})
    assert [o.peer for o in route] == [pid(1), pid(3), pid(4)]
    # ... or 2 after another first worker, whichever costs less; 2 itself is not avoided
    route = choose_route([a, a2, b, c], 0, 30, avoid_pairs={(pid(1), pid(2))})
    assert [o.peer for o in route] == [pid(5), pid(2), pid(4)]
    # with no other way, the pair is used (a penalty, not a ban)
    route = choose_route([a, b, c], 0, 30, avoid_pairs={(pid(1), pid(2))})
    assert [o.peer for o in route] == [pid(1), pid(2), pid(4)]
