"""Recovery inside one process: a bootstrap DHT node, four echo workers and a client session
in one ``trio.run``; the worker serving the route's middle hop is cancelled mid-session.

The subprocess tests (tests/swarm/test_tiny_recovery.py, tests/e2e/test_faults.py) kill
real processes; this one shows the same recovery with every task in view: the session
bans the dead hop, opens the spare, replays the stored inputs onto it, and keeps going.
"""

from __future__ import annotations

import logging

import pytest
import torch
import trio

from pymesh.client.session import InferenceSession
from pymesh.client.swarm import Swarm
from pymesh.net.dht import DHTNode
from pymesh.proto.identity import Identity
from pymesh.settings import ClientSettings, Settings, WorkerSettings
from pymesh.worker.server import Worker, WorkerOptions

pytestmark = pytest.mark.timeout(120)

SETTINGS = Settings(
    worker=WorkerSettings(skip_throughput=True, throughput=10.0, next_hop_timeout=2.0, step_wait=3.0),
    # copies every 4 steps: a recovery after step 6 needs a pm.flush of the unsent ones (with
    # verification on, copies come every step with the receipts: it is off here)
    client=ClientSettings(discovery_timeout=10.0, step_timeout=10.0, probe_after=0.5, probe_timeout=1.0,
                          rpc_timeout=3.0, copy_every=4, verify="off"),
    record_ttl=30.0, heartbeat=1.0, dht_timeout=0.5, transport_timeout=10.0,
)
SPANS = [(0, 2), (2, 4), (2, 4), (4, 6)]       # blocks 2-3 twice: the active hop and a spare
STEPS = 12
KILL_AFTER = 6


async def _serve(worker: Worker, scope: trio.CancelScope, *, task_status: trio.TaskStatus[Worker]) -> None:
    with scope:
        await worker.serve(task_status=task_status)


def test_cancelled_worker_is_replaced_and_echo_outputs_match(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pymesh.client")

    async def main() -> None:
        async with trio.open_nursery() as nursery, \
                DHTNode(Identity.generate(), host="127.0.0.1", port=0, config=SETTINGS.dht_config()) as boot:
            bootstrap = [f"127.0.0.1:{boot.port}"]
            workers: list[Worker] = []
            scopes: dict[int, trio.CancelScope] = {}
            for start, stop in SPANS:
                w = Worker(WorkerOptions(bootstrap, layers=(start, stop), host="127.0.0.1", transport="tcp",
                                         cache_tokens=256, settings=SETTINGS))
                scopes[id(w)] = trio.CancelScope()
                workers.append(await nursery.start(_serve, w, scopes[id(w)]))

            inputs = [torch.randn(1, 2 if k == 0 else 1, 8, generator=torch.Generator().manual_seed(k))
                      for k in range(STEPS)]
            async with Swarm(bootstrap, "echo", transport="tcp", settings=SETTINGS) as swarm:
                async with InferenceSession(swarm, 0, 6, max_tokens=STEPS + 1) as session:
                    assert [(o.start, o.stop) for o in session.route] == [(0, 2), (2, 4), (4, 6)]
                    outputs = []
                    for k, x in enumerate(inputs):
                        if k == KILL_AFTER:
                            victim = session.route[1]
                            doomed = next(w for w in workers if w.peer_id == victim.peer)
                            scopes[id(doomed)].cancel()    # its nodes close, its sessions vanish
                            await trio.sleep(0.1)
                        outputs.append(await session.step(x))
                    route = list(session.route)
                    recoveries = list(session.recoveries)
                    assert session.length == STEPS + 1
                spare = next(w for w in workers if w.peer_id != victim.peer and w.service.runtime.start == 2)
            nursery.cancel_scope.cancel()

        for k, (x, y) in enumerate(zip(inputs, outputs)):
            assert torch.equal(x, y), f"step {k}: echo output differs from its input"
        assert [(o.peer, o.start) for o in route] == [(route[0].peer, 0), (spare.peer_id, 2), (route[2].peer, 4)]
        assert len(recoveries) == 1, recoveries
        rec = recoveries[0]
        assert rec["step"] == KILL_AFTER
        assert rec["replaced"] == [route[1].describe()]
        assert rec["blamed"] == str(victim.peer)

    trio.run(main)
    # steps 0-5 replayed onto the spare; its inputs at block 2 came partly from a pm.flush
    # (copies travel every 4 steps, so those of steps 4-5 were still on the first worker)
    assert f"Client: replayed {KILL_AFTER} step(s) onto" in caplog.text
    assert "Client: fetched 2 unsent recovery copies from" in caplog.text
