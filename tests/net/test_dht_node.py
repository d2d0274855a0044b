"""Twenty real DHT nodes on loopback in one process: records, TTL expiry, forgeries."""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import replace

import pytest
import trio
import trio.testing

from pymesh.errors import LocalProtocolError
from pymesh.net.dht import DHTConfig, DHTNode, DHTRemoteError
from pymesh.proto import krpc
from pymesh.proto.addr import PeerAddr, parse_addr
from pymesh.proto.identity import Identity
from pymesh.proto.records import WorkerRecord, model_target

MODEL = "tiny@abc123"


def cfg(ttl: float = 30.0) -> DHTConfig:
    return DHTConfig(record_ttl=ttl, heartbeat=ttl / 3, rpc_timeout=0.5, bootstrap_timeout=5.0)


def rec(start: int, stop: int, port: int = 9100, model: str = MODEL) -> WorkerRecord:
    return WorkerRecord(model_id=model, start=start, stop=stop, host="127.0.0.1", port=port)


async def swarm(stack: AsyncExitStack, n: int, config: DHTConfig) -> list[DHTNode]:
    boot = await stack.enter_async_context(DHTNode(Identity.generate(), host="127.0.0.1", config=config))
    nodes = [boot]
    addr = [PeerAddr("127.0.0.1", boot.port)]
    for _ in range(n - 1):
        nodes.append(await stack.enter_async_context(
            DHTNode(Identity.generate(), host="127.0.0.1", bootstrap=addr, config=config)))
    return nodes


@pytest.mark.timeout(120)
def test_twenty_nodes_announce_find_and_list() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            nodes = await swarm(stack, 20, cfg())
            assert all(len(n.core.routing) >= 3 for n in nodes[1:])
            workers = nodes[1:5]
            spans = [(0, 8), (8, 16), (16, 24), (8, 24)]
            for w, (a, b) in zip(workers, spans):
                assert await w.publish_record(rec(a, b, port=w.port)) >= 1
            other = await nodes[6].publish_record(rec(0, 4, model="other@1"))
            assert other >= 1
            client = nodes[-1]
            providers = await client.find_block_providers(MODEL, 10)
            assert {(r.start, r.stop) for r in providers} == {(8, 16), (8, 24)}
            assert all(r.verify() for r in providers)
            assert {r.peer_id for r in providers} == {workers[1].identity.peer_id, workers[3].identity.peer_id}
            assert len(await client.find_model_records(MODEL)) == 4
            assert await nodes[12].list_models() == sorted([MODEL, "other@1"])
            assert len(await nodes[13].list_records()) == 5
            assert await client.find_block_providers(MODEL, 24) == []
            # A worker updates its record: the new one replaces the old, nothing duplicates.
            await workers[0].publish_record(replace(rec(0, 8), sessions=3))
            mine = [r for r in await client.find_model_records(MODEL) if r.peer_id == workers[0].identity.peer_id]
            assert len(mine) == 1 and mine[0].sessions == 3
    trio.run(main)


@pytest.mark.timeout(120)
def test_record_expires_once_refreshing_stops_and_offline_at_shutdown() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            nodes = await swarm(stack, 20, cfg(ttl=3.0))
            w1, w2, client = nodes[1], nodes[2], nodes[19]
            await w1.publish_record(rec(0, 4))
            await w2.publish_record(rec(4, 8))
            await trio.sleep(4.0)  # longer than the TTL: heartbeats keep both alive
            assert len(await client.find_model_records(MODEL)) == 2
            w1.stop_refreshing()
            deadline = trio.current_time() + 10
            while trio.current_time() < deadline:
                found = await client.find_model_records(MODEL)
                if [r.start for r in found] == [4]:
                    break
                await trio.sleep(0.5)
            assert [r.start for r in found] == [4]
            # Clean shutdown of w2 replaces its record with an offline one.
            async with DHTNode(Identity.generate(), host="127.0.0.1", config=cfg(ttl=3.0),
                               bootstrap=[PeerAddr("127.0.0.1", nodes[0].port)]) as w3:
                await w3.publish_record(rec(8, 12))
                assert len(await client.find_block_providers(MODEL, 9)) == 1
            assert await client.find_block_providers(MODEL, 9) == []
            offline = [r for r in await client.list_records(MODEL) if r.start == 8]
            assert offline and offline[0].state == "offline"
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))  # virtual time: no real waits


@pytest.mark.timeout(120)
def test_forged_records_are_refused_by_every_node() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            nodes = await swarm(stack, 20, cfg())
            alice, mallory, client = nodes[1], nodes[2], nodes[19]
            await alice.publish_record(rec(0, 8, port=1111))
            real = (await client.find_model_records(MODEL))[0]
            # Mallory re-signs Alice's record with her own key but keeps Alice's peer id in it.
            forged = replace(real, port=6666, timestamp=real.timestamp + 1,
                             signature=mallory.identity.sign(b"pymesh-record\0forged"))
            with pytest.raises(LocalProtocolError):
                await mallory.publish_record(forged)
            target = model_target(MODEL)
            for node in nodes:
                r = await mallory.query(("127.0.0.1", node.port), b"pm_get", {b"target": target})
                token = r.values[b"token"]
                with pytest.raises(DHTRemoteError) as exc:
                    await mallory.query(("127.0.0.1", node.port), b"pm_put",
                                        {b"target": target, b"rec": forged.to_bytes(), b"token": token})
                assert exc.value.code == krpc.INVALID_SIGNATURE
            found = await client.find_model_records(MODEL)
            assert [(r.peer_id, r.port) for r in found] == [(alice.identity.peer_id, 1111)]
    trio.run(main)


@pytest.mark.timeout(60)
def test_bootstrap_by_multiaddr_and_a_lone_bootstrap_stores_records() -> None:
    async def main() -> None:
        boot_id = Identity.generate()
        async with DHTNode(boot_id, host="127.0.0.1", config=cfg()) as boot:
            addr = parse_addr(f"/ip4/127.0.0.1/udp/{boot.port}/p2p/{boot_id.peer_id}")
            async with DHTNode(Identity.generate(), host="127.0.0.1", bootstrap=[addr], config=cfg()) as w, \
                    DHTNode(Identity.generate(), host="127.0.0.1", bootstrap=[addr], config=cfg()) as c:
                assert await w.publish_record(rec(0, 2)) >= 1
                assert [r.start for r in await c.find_block_providers(MODEL, 1)] == [0]
                assert boot.core.records.count(model_target(MODEL)) == 1
    trio.run(main)
