"""A worker restarted with the same identity and port, inside one process (issue 11, item 1):
a bootstrap DHT node, three echo workers 0-2 / 2-4 / 4-6 over TCP and a client session in
one ``trio.run``. The middle worker is cancelled mid-session and started again from its key
file on its port; its sessions are gone. The client must not ban it: the next step comes
back as a lost session or a failed link, the worker is opened again and replayed, and the
session goes on through the same three workers with the echo outputs intact.

(tests/hostile/test_restart.py does the same with real processes over QUIC, where only the
stateless reset ends the old connection.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio

from pymesh.client.session import InferenceSession
from pymesh.client.swarm import Swarm
from pymesh.net.dht import DHTNode
from pymesh.proto.identity import Identity
from pymesh.settings import ClientSettings, Settings, WorkerSettings
from pymesh.worker.server import Worker, WorkerOptions
from tests.client.test_recovery_inprocess import _serve

pytestmark = pytest.mark.timeout(120)

SETTINGS = Settings(
    worker=WorkerSettings(skip_throughput=True, throughput=10.0, next_hop_timeout=2.0, step_wait=3.0),
    client=ClientSettings(discovery_timeout=10.0, step_timeout=30.0, probe_after=0.5, probe_timeout=1.0,
                          rpc_timeout=3.0, copy_every=1),
    record_ttl=30.0, heartbeat=1.0, dht_timeout=0.5, transport_timeout=10.0,
)
SPANS = [(0, 2), (2, 4), (4, 6)]
STEPS = 8
RESTART_AT = 4


def test_restarted_middle_worker_is_reopened_not_banned(tmp_path: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery, \
                DHTNode(Identity.generate(), host="127.0.0.1", port=0, config=SETTINGS.dht_config()) as boot:
            bootstrap = [f"127.0.0.1:{boot.port}"]

            def options(i: int, port: int = 0) -> WorkerOptions:
                return WorkerOptions(bootstrap, layers=SPANS[i], host="127.0.0.1", port=port, transport="tcp",
                                     cache_tokens=256, identity=str(tmp_path / f"w{i}.key"), settings=SETTINGS)

            scopes = [trio.CancelScope() for _ in SPANS]
            workers: list[Worker] = [await nursery.start(_serve, Worker(options(i)), scopes[i])
                                     for i in range(len(SPANS))]
            inputs = [torch.randn(1, 2 if k == 0 else 1, 8, generator=torch.Generator().manual_seed(k))
                      for k in range(STEPS)]
            async with Swarm(bootstrap, "echo", transport="tcp", settings=SETTINGS) as swarm:
                async with InferenceSession(swarm, 0, 6, max_tokens=STEPS + 2) as session:
                    before = [o.peer for o in session.route]
                    resumed = -1.0
                    for k, x in enumerate(inputs):
                        if k == RESTART_AT:
                            port = session.route[1].port
                            scopes[1].cancel()
                            await trio.sleep(0.2)
                            scopes[1] = trio.CancelScope()
                            workers[1] = await nursery.start(_serve, Worker(options(1, port)), scopes[1])
                            assert workers[1].peer_id == before[1]
                        t0 = trio.current_time()
                        y = await session.step(x)
                        assert torch.equal(x, y), f"step {k}: echo output differs from its input"
                        if k == RESTART_AT:
                            resumed = trio.current_time() - t0
                    after = [o.peer for o in session.route]
                    recoveries = list(session.recoveries)
                    banned = dict(swarm.banned)
            nursery.cancel_scope.cancel()
        assert after == before
        assert banned == {}, f"the restarted worker must not be banned: {banned}"
        assert recoveries and all(r["verdict"] in ("lost", "link") for r in recoveries), recoveries
        assert resumed < SETTINGS.client.step_timeout / 3

    trio.run(main)
