"""Discovery over real in-process DHT nodes on loopback while nodes join and leave (issue 11,
item 1): a bootstrap, four worker nodes announcing 0-2 / 2-4 / 4-6 / 6-8, a plain DHT node,
and a client Swarm whose route searches run while a fifth worker node joins (announcing 0-2
as well) and the plain node leaves. Every search must find a full route.

The deterministic reproductions of partial reads (alternating halves, a layer only a
per-block read finds) are in test_discovery.py; this test runs the same code paths over the
real DHT."""

from __future__ import annotations

from typing import Any, Sequence

import pytest
import trio

from pymesh.client.routing import SpanOption
from pymesh.client.swarm import Swarm
from pymesh.net.dht import DHTNode
from pymesh.proto.addr import PeerAddr
from pymesh.proto.identity import Identity
from pymesh.proto.records import WorkerRecord
from pymesh.settings import ClientSettings, Settings

pytestmark = pytest.mark.timeout(120)

MODEL = "join@1"
SETTINGS = Settings(client=ClientSettings(discovery_timeout=15.0, rpc_timeout=3.0), record_ttl=60.0, heartbeat=20.0,
                    dht_timeout=0.5)
SPANS = [(0, 2), (2, 4), (4, 6), (6, 8)]


class NoRttSwarm(Swarm):
    async def measure_rtts(self, options: Sequence[SpanOption]) -> None:
        return None


async def run_node(boot: DHTNode, span: tuple[int, int] | None, stop: trio.Event, *,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A DHT node (announcing a worker record for ``span`` when given) until ``stop``."""
    async with DHTNode(Identity.generate(), host="127.0.0.1", bootstrap=[PeerAddr("127.0.0.1", boot.port)],
                       config=SETTINGS.dht_config()) as node:
        if span is not None:
            rec = WorkerRecord(model_id=MODEL, start=span[0], stop=span[1], host="127.0.0.1", port=node.port)
            assert await node.publish_record(rec) >= 1
        task_status.started()
        await stop.wait()


def test_route_searches_stay_complete_while_a_node_joins_and_another_leaves() -> None:
    async def main() -> None:
        async with DHTNode(Identity.generate(), host="127.0.0.1", config=SETTINGS.dht_config()) as boot, \
                trio.open_nursery() as nodes:
            end, leave = trio.Event(), trio.Event()
            for span in SPANS:
                await nodes.start(run_node, boot, span, end)
            # a DHT node that may hold records (one of 6 with k=8) and leaves mid-discovery
            await nodes.start(run_node, boot, None, leave)
            routes: list[list[Any]] = []
            async with NoRttSwarm([f"127.0.0.1:{boot.port}"], MODEL, transport="tcp", settings=SETTINGS) as swarm:

                async def searches() -> None:
                    for _ in range(6):
                        route = await swarm.find_route(0, 8)
                        routes.append([(o.start, o.stop) for o in route])
                        await trio.sleep(0.05)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(searches)
                    await trio.sleep(0.01)
                    await nodes.start(run_node, boot, (0, 2), end)      # a fifth worker joins mid-discovery
                    await trio.sleep(0.1)
                    leave.set()                                        # and a record holder leaves
            end.set()
            assert len(routes) == 6
            assert all(r[0][0] == 0 and r[-1][1] == 8 for r in routes), routes

    trio.run(main)
