"""1,000 DHT nodes in one process, no sockets: real KRPC packets between real DHTCores.

Nodes join only through one bootstrap node (a find_node to it, a lookup of their own
ID, then lookups into their still-sparse buckets, as in Kademlia's join). Then 20% of
them leave and stop answering; lookups must still return exactly the k closest live
nodes in >= 99% of cases.
"""

from __future__ import annotations

import pytest

from pymesh.bench.dht import SimNetwork, simulate
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
