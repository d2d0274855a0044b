"""The seed's network test: a test tensor through an echo chain, per-hop latency and throughput.

Workers in echo mode return their input, so every hop's ``pm.out`` copy arrives when
the tensor has travelled that far along the chain; the arrival times give each hop's
share of the latency.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from pymesh.client.routing import route_json
from pymesh.client.session import InferenceSession
from pymesh.client.swarm import Swarm

log = logging.getLogger(__name__)


@dataclass
class NetTestResult:
    route: list[dict[str, Any]] = field(default_factory=list)
    hop_ms: list[float] = field(default_factory=list)        # median time from send to each hop's output
    round_trip_ms: float = 0.0
    megabytes_per_s: float = 0.0
    rounds: int = 0
    tensor_shape: tuple[int, ...] = ()


async def run_network_test(swarm: Swarm, start: int, stop: int, *, hidden: int = 4096, seq: int = 1,
                           rounds: int = 10) -> NetTestResult:
    import torch

    result = NetTestResult(rounds=rounds, tensor_shape=(1, seq, hidden))
    x = torch.randn(1, seq, hidden, generator=torch.Generator().manual_seed(0))
    per_hop: list[list[float]] = []
    totals: list[float] = []
    async with InferenceSession(swarm, start, stop, max_tokens=seq * rounds, copy_every=1) as session:
        result.route = route_json(session.route)
        per_hop = [[] for _ in session.route]
        for _ in range(rounds):
            t0 = time.perf_counter()
            y = await session.step(x)
            totals.append(time.perf_counter() - t0)
            if not torch.equal(y, x):
                raise RuntimeError("the echo chain changed the test tensor: a worker is not in echo mode")
            for i, o in enumerate(session.route):
                per_hop[i].append(session.last_hop_times.get(o.start, float("nan")) * 1000)
    result.hop_ms = [statistics.median(v) for v in per_hop]
    result.round_trip_ms = statistics.median(totals) * 1000
    hops = max(len(result.route), 1)
    moved = x.numel() * x.element_size() * (hops + 1) * rounds
    result.megabytes_per_s = moved / sum(totals) / 1e6
    return result
