"""Transient and departed DHT nodes on loopback: read-only (BEP 43) lookers leave no trace
in routing tables, lookups do not wait on a dead contact more than once, and publishing
offline records at shutdown is bounded when nobody answers."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio
import trio.testing

from pymesh.errors import PeerUnavailable
from pymesh.net.dht import DHTConfig, DHTNode
from pymesh.proto.addr import PeerAddr
from pymesh.proto.identity import Identity
from pymesh.proto.krpc import Addr
from pymesh.proto.records import WorkerRecord

MODEL = "tiny@transient"


def cfg(**kw: object) -> DHTConfig:
    base: dict[str, object] = dict(record_ttl=60.0, heartbeat=20.0, rpc_timeout=2.0, bootstrap_timeout=8.0)
    base.update(kw)
    return DHTConfig(**base)  # type: ignore[arg-type]


def rec(port: int) -> WorkerRecord:
    return WorkerRecord(model_id=MODEL, start=0, stop=4, host="127.0.0.1", port=port)


def sent_to(node: DHTNode) -> list[Addr]:
    """Record the destination of every datagram ``node`` sends from now on."""
    out: list[Addr] = []
    send = node._send_nowait

    def spy(data: bytes, addr: Addr) -> None:
        out.append(addr)
        send(data, addr)

    node._send_nowait = spy  # type: ignore[method-assign]
    return out


async def join(stack: AsyncExitStack, boot: DHTNode | None, config: DHTConfig, *,
               read_only: bool = False) -> DHTNode:
    bootstrap = [PeerAddr("127.0.0.1", boot.port)] if boot is not None else []
    return await stack.enter_async_context(DHTNode(Identity.generate(), host="127.0.0.1", bootstrap=bootstrap,
                                                   config=config, read_only=read_only))


async def hold(boot: DHTNode | None, config: DHTConfig, leave: trio.Event, *,
               task_status: trio.TaskStatus[DHTNode] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a node in its own task until ``leave`` is set (nodes that depart mid-test)."""
    async with AsyncExitStack() as stack:
        task_status.started(await join(stack, boot, config))
        await leave.wait()


@pytest.mark.timeout(90)
def test_read_only_node_finds_records_but_is_in_no_routing_table() -> None:
    async def main() -> None:
        config = cfg(rpc_timeout=0.5)
        async with AsyncExitStack() as stack:
            boot = await join(stack, None, config)
            nodes = [boot] + [await join(stack, boot, config) for _ in range(7)]
            assert await nodes[1].publish_record(rec(nodes[1].port)) >= 1
            ro = await join(stack, boot, config, read_only=True)
            found = await ro.find_model_records(MODEL)
            assert [r.peer_id for r in found] == [nodes[1].identity.peer_id]
            assert await ro.list_models() == [MODEL]
            assert ro.stats["queries"] > 0 and ro.stats["answered"] == 0
            assert all(n.core.routing.get(ro.node_id) is None for n in nodes)
            assert len(ro.core.routing) >= 4  # it learns the swarm as usual
            with pytest.raises(PeerUnavailable):  # and answers nobody
                await nodes[2].ping(("127.0.0.1", ro.port))
            # a read-only publisher keeps no local copy (nobody could read it from here)
            await ro.publish_record(WorkerRecord(model_id="ro@1", start=0, stop=1, host="127.0.0.1", port=1))
            assert len(ro.core.records) == 0
            assert [r.model_id for r in await nodes[3].find_model_records("ro@1")] == ["ro@1"]
    trio.run(main)


@pytest.mark.timeout(120)
def test_lookups_wait_on_each_departed_node_at_most_once() -> None:
    async def main() -> None:
        config = cfg()
        async with AsyncExitStack() as stack:
            boot = await join(stack, None, config)
            live = [boot] + [await join(stack, boot, config) for _ in range(7)]
            worker = live[1]
            leave = trio.Event()
            async with trio.open_nursery() as nursery:
                leaving = [await nursery.start(hold, boot, config, leave) for _ in range(6)]
                assert await worker.publish_record(rec(worker.port)) >= 1
                leave.set()  # they leave without a word: their contacts stay in the tables
            dead = {(n.node_id, ("127.0.0.1", n.port)) for n in leaving}
            assert any(boot.core.routing.get(nid) is not None for nid, _ in dead)

            client = await join(stack, boot, config)
            sent = sent_to(client)
            stats0 = dict(client.stats)
            timings = []
            for _ in range(4):
                t0 = trio.current_time()
                found = await client.find_model_records(MODEL)
                timings.append(trio.current_time() - t0)
                assert [r.peer_id for r in found] == [worker.identity.peer_id]
            for nid, _ in dead:  # a lookup aimed right at each dead node
                await client.lookup(nid)
            dead_addrs = {addr for _, addr in dead}
            per_dead = {a: sent.count(a) for a in dead_addrs}
            print(f"find_model_records seconds {[round(t, 3) for t in timings]}, queries to dead nodes "
                  f"{sorted(per_dead.values())}, slow {client.stats['slow'] - stats0['slow']}, "
                  f"skipped {client.stats['skipped'] - stats0['skipped']}")
            # each departed node got at most one query after the client joined (its join
            # lookups may already have found them dead: then zero)
            assert max(per_dead.values()) <= 1, per_dead
            assert client.stats["skipped"] - stats0["skipped"] >= 1
            # the client met at least one dead contact while joining or since
            assert client.stats["slow"] + client.stats["timeouts"] >= 1
            # nothing that is alive was given up on for good
            assert all(not client.core.recently_failed(c, client.clock.wall())
                       for c in client.core.routing.closest(worker.node_id, 32)
                       if c.addr not in dead_addrs)
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))  # virtual time: no real waits


@pytest.mark.timeout(60)
def test_offline_publish_is_one_bounded_attempt_when_nobody_answers() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0.05)  # idle waits jump: virtual time

    async def main() -> None:
        config = cfg(rpc_timeout=2.0, offline_deadline=3.0)
        leave, stay = trio.Event(), trio.Event()
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as nursery:
                boot = await nursery.start(hold, None, config, leave)
                for _ in range(10):
                    await nursery.start(hold, boot, config, leave)
                node = await outer.start(hold, boot, config, stay)
                assert await node.publish_record(rec(node.port)) >= 1
                leave.set()  # bootstrap and everyone else are gone
            sent = sent_to(node)
            t0 = trio.current_time()
            await node.publish_offline()
            took = trio.current_time() - t0
            assert took <= config.offline_deadline + 0.1, took
            assert node.records.own == {}
            # one attempt: each known contact is asked at most once per target (2 targets)
            assert sent and len(sent) <= 2 * len(set(sent)), sent
            stay.set()
    trio.run(main, clock=clock)
