"""1,000 DHT nodes in one process, no sockets: real KRPC packets between real DHTCores.

Nodes join only through one bootstrap node (a find_node to it, a lookup of their own
ID, then lookups into their still-sparse buckets, as in Kademlia's join). Then 20% of
them leave and stop answering; lookups must still return exactly the k closest live
nodes in >= 99% of cases.
"""

from __future__ import annotations

import pytest

from pymesh.proto.dht_sim import SimNetwork, simulate
from pymesh.proto import krpc


@pytest.mark.timeout(240)
def test_thousand_nodes_with_churn() -> None:
    row = simulate(1000, 300, churn=0.2, seed=11)
    print(f"\n1,000 nodes, 20% departed: success {row['success_rate']:.3f}, median rounds "
          f"{row['median_rounds']}, p95 rounds {row['p95_rounds']}, "
          f"{row['messages_per_lookup']:.1f} messages per lookup; alpha-only batches: success "
          f"{row['alpha_only_success_rate']:.3f}, median rounds {row['alpha_only_median_rounds']}")
    assert row["success_rate"] >= 0.99
    assert row["median_rounds"] <= 6
    assert row["alpha_only_success_rate"] >= 0.99


@pytest.mark.timeout(120)
def test_departed_nodes_time_out_and_the_wire_is_real() -> None:
    net = SimNetwork(seed=5)
    for _ in range(60):
        net.join(net.add_node())
    boot = net.bootstrap
    assert boot is not None
    # Nothing but the bootstrap was given to anyone: every other entry was learned.
    some = sorted(net.alive)[10]
    assert len(net.cores[some].routing) > 1
    gone = sorted(net.alive)[20]
    net.leave(gone)
    before = net.messages
    assert net.query(some, gone, b"ping", {}) is None  # a departed node just times out
    assert net.messages == before + 1
    resp = net.query(some, boot, b"find_node", {b"target": net.ids[gone]})
    assert resp is not None
    assert all(len(c.node_id) == 20 for c in krpc.reply_nodes_untrusted(resp.values))
    stats = [net.measure_lookup(some) for _ in range(20)]
    assert sum(s.ok for s in stats) >= 19


def _lookups_after_departures(remember_failures: bool) -> tuple[list, dict]:  # type: ignore[type-arg]
    net = SimNetwork(seed=9)
    for _ in range(200):
        net.join(net.add_node())
    live = sorted(net.alive)
    gone = set(net.rng.sample([a for a in live if a != net.bootstrap], 50))
    for a in gone:
        net.leave(a)
    if not remember_failures:
        for core in net.cores.values():
            core.failed_for = 0.0
    searcher = sorted(net.alive)[7]
    sent: dict[tuple[str, int], int] = {}
    query = net.query

    def counting(src, dst, method, args, expect_id=None):  # type: ignore[no-untyped-def]
        if src == searcher and dst in gone:
            sent[dst] = sent.get(dst, 0) + 1
        return query(src, dst, method, args, expect_id)

    net.query = counting  # type: ignore[method-assign]
    return [net.measure_lookup(searcher) for _ in range(30)], sent


@pytest.mark.timeout(180)
def test_a_searcher_queries_each_departed_node_at_most_once() -> None:
    """No maintenance after 25% leave, so their contacts stay in every routing table:
    one node's repeated lookups still send at most one query to each departed node, and
    find as many true k-closest sets as lookups that keep asking the dead."""
    stats, sent = _lookups_after_departures(True)
    assert sent, "the searcher never met a departed node: the test proves nothing"
    assert max(sent.values()) == 1, sent
    assert sum(s.dead for s in stats[15:]) < sum(s.dead for s in stats[:15])
    base, base_sent = _lookups_after_departures(False)
    assert max(base_sent.values()) > 1  # without the memory the dead are asked again
    assert sum(s.ok for s in stats) >= sum(s.ok for s in base)
    assert sum(s.rounds for s in stats) <= sum(s.rounds for s in base)
