"""Reachability between real DHT nodes on loopback: observed-address belief and dial-back."""

from __future__ import annotations

import socket
from contextlib import AsyncExitStack

import pytest
import trio

from pymesh.net.dht import DHTConfig, DHTNode, DHTRemoteError
from pymesh.proto import dialback, krpc
from pymesh.proto.addr import PeerAddr
from pymesh.proto.identity import Identity
from pymesh.proto.krpc import Query


def cfg() -> DHTConfig:
    return DHTConfig(rpc_timeout=1.0, bootstrap_timeout=5.0)


async def node(stack: AsyncExitStack, boot: DHTNode | None = None, *, read_only: bool = False) -> DHTNode:
    bootstrap = [] if boot is None else [PeerAddr("127.0.0.1", boot.port)]
    return await stack.enter_async_context(
        DHTNode(Identity.generate(), host="127.0.0.1", bootstrap=bootstrap, config=cfg(), read_only=read_only))


@pytest.mark.timeout(60)
def test_probe_arrives_from_a_fresh_port_and_rate_limit_holds() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            public = await node(stack)
            asker = await node(stack, public, read_only=True)  # a client can check itself too
            result = await asker.dialback_check(("127.0.0.1", public.port), timeout=2.0)
            assert result.reachable
            assert result.observed == ("127.0.0.1", asker.port)
            assert result.probe_from is not None and result.probe_from[1] != public.port
            with pytest.raises(DHTRemoteError) as refused:  # one per source IP per 10 s
                await asker.dialback_check(("127.0.0.1", public.port), timeout=0.5)
            assert refused.value.code == krpc.GENERIC_ERROR
            assert public.core.dialback_limiter.refused == 1
    trio.run(main)


@pytest.mark.timeout(60)
def test_a_request_naming_another_address_still_probes_only_its_source() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            public = await node(stack)
            victim = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await victim.bind(("127.0.0.1", 0))
            attacker = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await attacker.bind(("127.0.0.1", 0))
            victim_addr = victim.getsockname()
            packed = krpc.pack_addr(victim_addr)
            query = krpc.encode_query(b"tx", dialback.DIALBACK, {
                b"id": b"\x07" * 20, b"nonce": b"N" * 16, b"ip": packed, b"addr": packed,
                b"port": victim_addr[1]})
            await attacker.sendto(query, ("127.0.0.1", public.port))
            got: list[tuple[bytes, tuple[str, int]]] = []
            with trio.move_on_after(2.0):
                while len(got) < 2:
                    got.append(await attacker.recvfrom(2048))
            kinds = [krpc.decode_message_untrusted(d) for d, _ in got]
            probes = [m for m in kinds if isinstance(m, Query) and m.method == dialback.PROBE]
            assert len(probes) == 1 and probes[0].args[b"nonce"] == b"N" * 16
            for (_, src), m in zip(got, kinds):
                if isinstance(m, Query):
                    assert src[1] != public.port  # the probe: from a fresh port
                else:
                    assert src == ("127.0.0.1", public.port)  # the reply: from the DHT socket
            with trio.move_on_after(0.5):
                data, _ = await victim.recvfrom(2048)
                pytest.fail(f"the victim received {data!r}")
            victim.close()
            attacker.close()
    trio.run(main)


@pytest.mark.timeout(60)
def test_loopback_swarm_believes_its_address_from_replies() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            boot = await node(stack)
            others = [await node(stack, boot) for _ in range(4)]
            me = await node(stack, boot)
            for o in others:  # answered queries: each reply's "ip" is a report
                await me.ping(("127.0.0.1", o.port))
            assert me.core.observed.belief() == ("127.0.0.1", me.port)
            assert me.core.observed.mapping == "stable"
    trio.run(main)


@pytest.mark.timeout(60)
def test_a_reply_only_filter_drops_the_probe() -> None:
    """A connected UDP socket accepts datagrams only from the address:port it contacted, as
    a port-restricted NAT does: the reply gets through, the probe (from a fresh port) does not."""
    async def main() -> None:
        async with AsyncExitStack() as stack:
            public = await node(stack)
            behind = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await behind.bind(("127.0.0.1", 0))
            await behind.connect(("127.0.0.1", public.port))
            await behind.send(krpc.encode_query(b"tx", dialback.DIALBACK, {b"id": b"\x08" * 20,
                                                                             b"nonce": b"M" * 16}))
            got: list[bytes] = []
            with trio.move_on_after(1.0):
                while True:
                    got.append(await behind.recv(2048))
            assert [type(krpc.decode_message_untrusted(d)).__name__ for d in got] == ["Response"]
            assert public.core.dialback_limiter.refused == 0  # the probe was sent, and filtered
            behind.close()
    trio.run(main)


@pytest.mark.timeout(60)
def test_after_a_hostile_dialback_burst_the_node_still_serves_honest_peers() -> None:
    """An attacker sends malformed pm_dialback requests, forged probes and a flood of valid
    requests from one IP; the node stays up, probes that IP at most once, and an honest peer on
    another address still gets its dial-back and ordinary DHT answers."""
    import random

    async def main() -> None:
        async with AsyncExitStack() as stack:
            public = await node(stack)
            attacker = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await attacker.bind(("127.0.0.1", 0))
            rng = random.Random(5)
            bad_args: list[dict[bytes, object]] = [
                {b"id": b"\x01" * 20},                                  # no nonce
                {b"id": b"\x01" * 20, b"nonce": b"short"},              # wrong length
                {b"id": b"\x01" * 20, b"nonce": 7},                     # wrong type
                {b"id": b"\x01" * 20, b"nonce": b"N" * 4000},           # oversized
                {b"id": b"\x01" * 5, b"nonce": b"N" * 16},              # bad node id
            ]
            for i in range(200):                                        # bounded burst
                if i % 4 == 0:
                    data = krpc.encode_query(b"t%d" % i, dialback.DIALBACK, bad_args[i % len(bad_args)])
                elif i % 4 == 1:
                    data = krpc.encode_query(b"t%d" % i, dialback.PROBE, {b"id": b"\x02" * 20, b"nonce": b"P" * 16})
                elif i % 4 == 2:
                    data = krpc.encode_query(b"t%d" % i, dialback.DIALBACK, {b"id": b"\x03" * 20,
                                                                              b"nonce": rng.randbytes(16)})
                else:
                    data = krpc.encode_query(b"t%d" % i, dialback.DIALBACK, {b"id": b"\x04" * 20})[:rng.randrange(1, 40)]
                await attacker.sendto(data, ("127.0.0.1", public.port))
            await trio.sleep(0.3)
            assert public.core.dialback_limiter.refused >= 40  # the valid flood: one probe for that IP
            honest = await stack.enter_async_context(
                DHTNode(Identity.generate(), host="127.0.0.2", bootstrap=[PeerAddr("127.0.0.1", public.port)],
                        config=cfg(), read_only=True))
            result = await honest.dialback_check(("127.0.0.1", public.port), timeout=2.0)
            assert result.reachable and result.observed == ("127.0.0.2", honest.port)
            assert await honest.ping(("127.0.0.1", public.port)) == public.node_id
            attacker.close()
    trio.run(main)
