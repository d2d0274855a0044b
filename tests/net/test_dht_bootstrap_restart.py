"""A bootstrap node restarted on the same address re-learns a live swarm."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio
import trio.testing

from pymesh.net.dht import DHTConfig, DHTNode
from pymesh.proto.addr import PeerAddr
from pymesh.proto.identity import Identity
from pymesh.proto.records import WorkerRecord

MODEL = "tiny@restart"


def cfg() -> DHTConfig:
    return DHTConfig(record_ttl=3.0, heartbeat=1.0, rpc_timeout=0.5, bootstrap_timeout=3.0)


@pytest.mark.timeout(60)
def test_restarted_bootstrap_relearns_swarm_and_records() -> None:
    async def run_first(stop: trio.Event, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with DHTNode(Identity.generate(), host="127.0.0.1", config=cfg()) as first:
            task_status.started(first.port)
            await stop.wait()

    async def main() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            port = await nursery.start(run_first, stop)
            boot = [PeerAddr("127.0.0.1", port)]
            nodes = [await stack.enter_async_context(
                DHTNode(Identity.generate(), host="127.0.0.1", bootstrap=boot, config=cfg())) for _ in range(4)]
            assert all(len(n.core.routing) >= 1 for n in nodes)
            await nodes[0].publish_record(WorkerRecord(model_id=MODEL, start=0, stop=2, host="127.0.0.1",
                                                       port=9100))
            stop.set()
            await trio.sleep(1.5)  # the workers' maintenance meets the dead bootstrap
            again = await stack.enter_async_context(
                DHTNode(Identity.generate(), host="127.0.0.1", port=port, config=cfg()))
            assert len(again.core.routing) == 0
            deadline = trio.current_time() + 20
            while trio.current_time() < deadline and len(again.core.routing) < len(nodes):
                await trio.sleep(0.25)
            assert len(again.core.routing) == len(nodes), "the restarted bootstrap did not hear from every node"
            async with DHTNode(Identity.generate(), host="127.0.0.1", bootstrap=boot, config=cfg(),
                               read_only=True) as client:
                recs = await client.find_model_records(MODEL)
            assert [(r.start, r.stop) for r in recs] == [(0, 2)]
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))  # virtual time: no real waits


@pytest.mark.timeout(30)
def test_dead_bootstrap_is_retried_with_backoff() -> None:
    async def main() -> None:
        probe = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
        await probe.bind(("127.0.0.1", 0))
        dead = PeerAddr("127.0.0.1", probe.getsockname()[1])
        async with DHTNode(Identity.generate(), host="127.0.0.1", config=cfg()) as live, \
                DHTNode(Identity.generate(), host="127.0.0.1", config=cfg(),
                        bootstrap=[PeerAddr("127.0.0.1", live.port), dead]) as node:
            node.config.rpc_timeout = 0.2
            got: list[float] = []
            with trio.move_on_after(6.0):
                while True:  # the node queries the silent address; count how often
                    await probe.recvfrom(2048)
                    got.append(trio.current_time())
            # period 1 s, backoff doubling to 8 s: well under one query per tick over 6 s
            assert 1 <= len(got) <= 4, got
            assert (node.bootstrapper.backoff.wait(dead) or 0.0) > 1.0
        probe.close()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))  # virtual time: no real waits
