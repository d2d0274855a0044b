"""Relays on loopback: reservations, end-to-end encrypted circuits, quotas, hostile input,
a relay that lies about whom it connects to, and hole punching coordinated over a circuit."""

from __future__ import annotations

import socket
import struct
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio

from pymesh.errors import IdentityError, PeerUnavailable, PymeshError
from pymesh.net.punch import Puncher
from pymesh.net.relay import RelayLimits, RelayService
from pymesh.net.relay_client import RelayKeeper
from pymesh.net.rpc import CallContext, RpcNode
from pymesh.proto import reach as rp
from pymesh.proto.identity import Identity, PeerID
from pymesh.proto.reach import Reach, RelayAddr

SECRET = b"the plaintext a relay must never see " * 4


async def echo(ctx: CallContext, meta: Any, tensors: Any) -> Any:
    return {"from": ctx.peer.key, "x": meta.get("x"), "path": ctx.connection.path,
            "ip": ctx.connection.remote_host or ""}, tensors


class Relay:
    """An RpcNode (QUIC) plus a RelayService listening for circuits on the same port number (TCP)."""

    def __init__(self, service: RelayService) -> None:
        self.service = service
        self.node: RpcNode | None = None
        self.port = 0

    async def start(self, stack: AsyncExitStack, nursery: trio.Nursery) -> "Relay":
        self.node = await stack.enter_async_context(RpcNode(Identity.generate(), transport="quic"))
        self.port = await self.node.listen("127.0.0.1", 0)
        self.service.register(self.node)
        await nursery.start(self.service.serve_tcp, "127.0.0.1", self.port)
        return self

    @property
    def peer(self) -> PeerID:
        assert self.node is not None
        return self.node.peer_id

    def addr(self) -> RelayAddr:
        return RelayAddr(self.peer.key, "127.0.0.1", self.port)


class Recording(RelayService):
    """A relay that keeps every byte it carries (what an operator could read)."""

    def __init__(self, limits: RelayLimits | None = None) -> None:
        super().__init__(limits)
        self.seen = bytearray()

    async def _splice(self, a: Any, b: Any, bucket: Any) -> None:
        seen = self.seen

        class Tap:
            def __init__(self, s: Any) -> None:
                self.s = s

            async def receive_some(self, n: int) -> bytes:
                data: bytes = await self.s.receive_some(n)
                seen.extend(data)
                return data

            async def send_all(self, data: bytes) -> None:
                await self.s.send_all(data)

        await super()._splice(Tap(a), Tap(b), bucket)  # type: ignore[arg-type]


async def behind_nat(stack: AsyncExitStack, nursery: trio.Nursery, relays: list[Relay],
                     transport: str = "quic") -> tuple[RpcNode, RelayKeeper]:
    node = await stack.enter_async_context(RpcNode(Identity.generate(), transport=transport))
    await node.listen("127.0.0.1", 0)
    node.register("echo", echo)

    async def find() -> list[tuple[PeerID, str, int]]:
        return [(r.peer, "127.0.0.1", r.port) for r in relays]

    keeper = RelayKeeper(node, find, period=0.2)
    await nursery.start(keeper.run)
    return node, keeper


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dialer_transport", ["quic", "tcp"])
def test_a_relayed_call_is_end_to_end_encrypted_and_authenticated(dialer_transport: str) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            relay = await Relay(Recording()).start(stack, nursery)
            worker, keeper = await behind_nat(stack, nursery, [relay])
            assert keeper.relays() == (relay.addr(),)
            assert keeper.observed() is not None   # the relay saw its QUIC socket
            client = await stack.enter_async_context(RpcNode(Identity.generate(), transport=dialer_transport))
            client.learn_reach(worker.peer_id, Reach("relay", (relay.addr(),)))
            # the record's own host and port are never dialed for a peer behind NAT
            conn = await client.connect("203.0.113.9", 9, worker.peer_id)
            assert conn.path == "relayed"
            meta, _ = await conn.call("echo", {"x": SECRET}, timeout=5)
            assert meta["x"] == SECRET and meta["from"] == client.peer_id.key and meta["path"] == b"relayed"
            assert await client.connect("203.0.113.9", 9, worker.peer_id) is conn   # reused
            svc = relay.service
            assert isinstance(svc, Recording)
            assert svc.counters["circuits"] == 1 and keeper.accepted == 1
            assert len(svc.seen) > len(SECRET) and SECRET[:24] not in bytes(svc.seen)
            await conn.aclose()
            nursery.cancel_scope.cancel()
    trio.run(main)


class Liar(RelayService):
    """A relay that joins every circuit to one peer of its choosing, whoever was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.victim: PeerID | None = None

    def _live(self, peer: PeerID) -> Any:
        assert self.victim is not None
        return super()._live(self.victim)


@pytest.mark.timeout(60)
def test_a_relay_cannot_pose_as_the_peer_or_join_the_dialer_to_another() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            liar = Liar()
            relay = await Relay(liar).start(stack, nursery)
            other, _ = await behind_nat(stack, nursery, [relay])
            liar.victim = other.peer_id
            wanted = Identity.generate().peer_id       # asks for a peer the relay has no way to reach
            client = await stack.enter_async_context(RpcNode(Identity.generate(), transport="tcp"))
            client.learn_reach(wanted, Reach("relay", (relay.addr(),)))
            with pytest.raises((IdentityError, PeerUnavailable)):
                await client.connect("203.0.113.9", 9, wanted)
            assert not client.connections()
            # and the relay itself cannot answer as the wanted peer either: its key is not the peer's
            assert relay.peer != wanted
            nursery.cancel_scope.cancel()
    trio.run(main)


@pytest.mark.timeout(60)
def test_quotas_refuse_with_a_reason_and_free_up_when_circuits_end() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            relay = await Relay(RelayService(RelayLimits(max_circuits_per_peer=1))).start(stack, nursery)
            worker, _ = await behind_nat(stack, nursery, [relay])
            reach = Reach("relay", (relay.addr(),))
            a = await stack.enter_async_context(RpcNode(Identity.generate(), transport="tcp"))
            b = await stack.enter_async_context(RpcNode(Identity.generate(), transport="tcp"))
            for n in (a, b):
                n.learn_reach(worker.peer_id, reach)
            first = await a.connect("203.0.113.9", 9, worker.peer_id)
            with pytest.raises(PeerUnavailable, match="circuits through this relay already"):
                await b.connect("203.0.113.9", 9, worker.peer_id)
            assert relay.service.counters["over_peer"] == 1
            await first.aclose()
            with trio.fail_after(10):
                while relay.service.circuits:
                    await trio.sleep(0.05)
            second = await b.connect("203.0.113.9", 9, worker.peer_id)
            meta, _ = await second.call("echo", {"x": 1}, timeout=5)
            assert meta["x"] == 1
            nursery.cancel_scope.cancel()
    trio.run(main)


async def _raw(port: int, data: bytes, *, read: bool = True) -> bytes:
    s = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        if data:
            await s.send_all(data)
        if not read:
            return b""
        out = b""
        with trio.move_on_after(3):
            while True:
                try:
                    chunk = await s.receive_some(1024)
                except trio.BrokenResourceError:   # the relay reset a connection it stopped reading
                    break
                if not chunk:
                    break
                out += chunk
        return out
    finally:
        await s.aclose()


@pytest.mark.timeout(90)
def test_hostile_circuit_requests_leave_honest_circuits_served() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            limits = RelayLimits(header_timeout=0.5, max_pending_headers=8, accept_timeout=1.0)
            relay = await Relay(RelayService(limits)).start(stack, nursery)
            worker, _ = await behind_nat(stack, nursery, [relay])
            port = relay.port
            bad = [b"GET / HTTP/1.1\r\n\r\n", b"PMR1\xff\xff", b"PMR1\x00\x05hello", b"PMR1\x00\x00",
                   rp.MAGIC + struct.pack(">H", 40) + b"d2:op1:ce" + b"x" * 31,
                   rp.encode_request(rp.CircuitRequest(rp.OP_ACCEPT, circuit=b"z" * 16)),
                   rp.encode_request(rp.CircuitRequest(rp.OP_CONNECT, target=b"q" * 32)),
                   b"PMR1\x00\x10d2:op1:ce"]  # truncated: the relay waits, then drops it
            answers = []
            async with trio.open_nursery() as flood:
                async def one(data: bytes) -> None:
                    answers.append(await _raw(port, data))
                for data in bad:
                    flood.start_soon(one, data)
            # slowloris: more connections that send nothing than max_pending_headers
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
            await trio.sleep(1.0)          # past header_timeout: the relay dropped them
            assert relay.service.counters["headers_full"] >= 1
            for s in socks:
                s.close()
            refusals = [rp.parse_status_head_untrusted(a[:3])[0] for a in answers if len(a) >= 3]
            assert rp.STATUS_NO_RESERVATION in refusals and rp.STATUS_REFUSED in refusals
            assert relay.service.counters["bad_headers"] >= 4
            assert relay.service.headers == 0 and relay.service.circuits == 0
            client = await stack.enter_async_context(RpcNode(Identity.generate(), transport="tcp"))
            client.learn_reach(worker.peer_id, Reach("relay", (relay.addr(),)))
            conn = await client.connect("203.0.113.9", 9, worker.peer_id)
            meta, _ = await conn.call("echo", {"x": 7}, timeout=5)
            assert meta["x"] == 7
            nursery.cancel_scope.cancel()
    trio.run(main)


@pytest.mark.timeout(60)
def test_a_dead_relay_is_replaced_and_the_other_still_carries() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            first_scope = trio.CancelScope()

            async def run_first(task_status: trio.TaskStatus[Relay]) -> None:
                with first_scope:
                    async with trio.open_nursery() as own, AsyncExitStack() as own_stack:
                        task_status.started(await Relay(RelayService()).start(own_stack, own))
                        await trio.sleep_forever()

            first: Relay = await nursery.start(run_first)
            second = await Relay(RelayService()).start(stack, nursery)
            worker, keeper = await behind_nat(stack, nursery, [first, second])
            assert set(keeper.relays()) == {first.addr(), second.addr()}
            reach = Reach("relay", (first.addr(), second.addr()))
            first_scope.cancel()     # the first relay dies: node and circuit listener
            # the first relay is gone (its node closed; its TCP listener keeps refusing nothing: stop it too)
            client = await stack.enter_async_context(RpcNode(Identity.generate(), transport="tcp"))
            with trio.fail_after(10):
                while first.addr() in keeper.relays():
                    await trio.sleep(0.05)
            assert keeper.relays() == (second.addr(),)
            client.learn_reach(worker.peer_id, reach)
            conn = await client.connect("203.0.113.9", 9, worker.peer_id)   # first refuses: no reservation
            meta, _ = await conn.call("echo", {"x": 3}, timeout=5)
            assert meta["x"] == 3 and second.service.counters["circuits"] == 1
            nursery.cancel_scope.cancel()
    trio.run(main)


@pytest.mark.timeout(60)
def test_hole_punching_opens_a_direct_quic_path_or_falls_back_to_the_relay() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            relay = await Relay(RelayService()).start(stack, nursery)
            worker, keeper = await behind_nat(stack, nursery, [relay])
            Puncher(worker, keeper.observed)
            reach = keeper.reach(punch=True)
            assert reach is not None and reach.mode == "punch"
            client = await stack.enter_async_context(RpcNode(Identity.generate(), transport="quic"))
            puncher = Puncher(client)
            client.learn_reach(worker.peer_id, reach)
            conn = await client.connect("203.0.113.9", 9, worker.peer_id)
            assert conn.path == "punched", puncher.attempts
            meta, _ = await conn.call("echo", {"x": 5}, timeout=5)
            assert meta["x"] == 5 and meta["path"] == b"direct"   # the worker accepted it as a QUIC dial
            assert puncher.attempts[-1]["ok"] is True

            # a peer whose mapping is not where it says (as behind a symmetric NAT): relayed
            liar, liar_keeper = await behind_nat(stack, nursery, [relay])
            free = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            free.bind(("127.0.0.1", 0))
            Puncher(liar, lambda: ("127.0.0.1", free.getsockname()[1]), timeout=1.0)
            puncher.timeout = 1.0
            lreach = liar_keeper.reach(punch=True)
            assert lreach is not None
            client.learn_reach(liar.peer_id, lreach)
            conn2 = await client.connect("203.0.113.9", 9, liar.peer_id)
            assert conn2.path == "relayed" and puncher.attempts[-1]["ok"] is False
            meta, _ = await conn2.call("echo", {"x": 6}, timeout=5)
            assert meta["x"] == 6
            free.close()

            # a dialer that knows its own NAT maps each destination apart does not even try
            symmetric = await stack.enter_async_context(RpcNode(Identity.generate(), transport="quic"))
            held_back = Puncher(symmetric, can_dial=lambda: False)
            symmetric.learn_reach(worker.peer_id, reach)
            conn3 = await symmetric.connect("203.0.113.9", 9, worker.peer_id)
            assert conn3.path == "relayed" and held_back.attempts == []
            nursery.cancel_scope.cancel()
    trio.run(main)


@pytest.mark.timeout(60)
def test_reservations_per_address_are_capped_and_the_refusal_says_so() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            relay = await Relay(RelayService(RelayLimits(max_reservations_per_ip=1))).start(stack, nursery)
            _, first = await behind_nat(stack, nursery, [relay])
            assert first.relays() == (relay.addr(),)
            second = await stack.enter_async_context(RpcNode(Identity.generate(), transport="quic"))
            keeper = RelayKeeper(second, lambda: _none())
            from pymesh.net.conn import RemoteError
            with pytest.raises(RemoteError, match="at your address hold reservations"):
                await keeper.reserve(relay.peer, "127.0.0.1", relay.port)
            assert relay.service.counters["reserve_ip_full"] == 1
            nursery.cancel_scope.cancel()
    trio.run(main)


async def _none() -> list[tuple[PeerID, str, int]]:
    return []


@pytest.mark.timeout(60)
def test_hostile_punch_and_incoming_pushes_are_refused_and_honest_punching_still_works() -> None:
    from pymesh.net.conn import RemoteError
    from pymesh.net.punch import PUNCH
    from pymesh.net.relay_client import INCOMING

    async def main() -> None:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            relay = await Relay(RelayService()).start(stack, nursery)
            worker, keeper = await behind_nat(stack, nursery, [relay])
            puncher = Puncher(worker, keeper.observed)
            sent: list[tuple[str, int]] = []
            real_send = worker.send_datagram
            worker.send_datagram = lambda addr, data: (sent.append(addr), real_send(addr, data))  # type: ignore
            hostile = await stack.enter_async_context(RpcNode(Identity.generate(), transport="quic"))
            direct = await hostile.connect("127.0.0.1", worker.port or 0, worker.peer_id)
            # a direct (not relayed) caller cannot make the worker send datagrams anywhere
            with pytest.raises(RemoteError, match="relayed connection only"):
                await direct.call(PUNCH, {"a": [b"198.51.100.7", 53]}, timeout=5)
            # a push claiming to come from a relay, on a connection that holds no reservation
            accepted = keeper.accepted
            await direct.push(INCOMING, {"c": b"x" * 16})
            await trio.sleep(0.3)
            assert keeper.accepted == accepted and keeper.accepting == 0
            # through a relay: malformed, then once, then again at once (rate limited)
            hostile.learn_reach(worker.peer_id, Reach("relay", (relay.addr(),)))
            await direct.aclose()
            relayed = await hostile.connect("203.0.113.9", 9, worker.peer_id)
            assert relayed.path == "relayed"
            for bad in ({"a": [b"not an ip", 1]}, {"a": [b"1.2.3.4", 0]}, {"a": b"x" * 4000}, {}):
                with pytest.raises(RemoteError, match="bad_request"):
                    await relayed.call(PUNCH, bad, timeout=5)
            await relayed.call(PUNCH, {"a": [b"127.0.0.1", 9]}, timeout=5)
            with pytest.raises(RemoteError, match="rate_limited"):
                await relayed.call(PUNCH, {"a": [b"127.0.0.1", 9]}, timeout=5)
            await trio.sleep(0.7)
            assert sent and set(sent) == {("127.0.0.1", 9)}  # only where the caller asked, ten at most
            assert len(sent) <= 10
            # an honest client still gets its direct path
            client = await stack.enter_async_context(RpcNode(Identity.generate(), transport="quic"))
            Puncher(client)
            reach = keeper.reach(punch=True)
            assert reach is not None
            client.learn_reach(worker.peer_id, reach)
            conn = await client.connect("203.0.113.9", 9, worker.peer_id)
            assert conn.path == "punched"
            assert puncher is worker.punch
            nursery.cancel_scope.cancel()
    trio.run(main)


@pytest.mark.timeout(60)
def test_a_tcp_node_serves_rpc_and_relay_circuits_on_one_port() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            service = RelayService()
            relay_node = await stack.enter_async_context(RpcNode(Identity.generate(), transport="tcp"))
            port = await relay_node.listen("127.0.0.1", 0)
            relay_node.register("echo", echo)
            service.register(relay_node)
            relay_node.stream_hook = (rp.MAGIC, service.handle_stream)
            service.tcp_port = port
            worker = await stack.enter_async_context(RpcNode(Identity.generate(), transport="tcp"))
            await worker.listen("127.0.0.1", 0)
            worker.register("echo", echo)

            async def find() -> list[tuple[PeerID, str, int]]:
                return [(relay_node.peer_id, "127.0.0.1", port)]

            keeper = RelayKeeper(worker, find)
            await nursery.start(keeper.run)
            assert keeper.relays() == (RelayAddr(relay_node.peer_id.key, "127.0.0.1", port),)
            client = await stack.enter_async_context(RpcNode(Identity.generate(), transport="tcp"))
            plain = await client.connect("127.0.0.1", port, relay_node.peer_id)     # TLS RPC on the port
            meta, _ = await plain.call("echo", {"x": 1}, timeout=5)
            assert meta["x"] == 1 and meta["path"] == b"direct"
            client.learn_reach(worker.peer_id, Reach("relay", keeper.relays()))
            conn = await client.connect("203.0.113.9", 9, worker.peer_id)             # a circuit on the same port
            meta, _ = await conn.call("echo", {"x": 2}, timeout=5)
            assert meta["x"] == 2 and meta["path"] == b"relayed" and conn.path == "relayed"
            nursery.cancel_scope.cancel()
    trio.run(main)


class Reporting(RelayService):
    """A relay whose dialers all come from one documentation address."""

    async def _connect(self, stream: Any, target: PeerID, ip: str) -> None:
        await super()._connect(stream, target, "198.51.100.9")


@pytest.mark.timeout(60)
def test_a_relayed_peer_counts_against_the_address_the_relay_saw_not_the_relays() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            relay = await Relay(Reporting()).start(stack, nursery)
            worker, _ = await behind_nat(stack, nursery, [relay])
            client = await stack.enter_async_context(RpcNode(Identity.generate(), transport="tcp"))
            client.learn_reach(worker.peer_id, Reach("relay", (relay.addr(),)))
            conn = await client.connect("203.0.113.9", 9, worker.peer_id)
            meta, _ = await conn.call("echo", {"x": 1}, timeout=5)
            assert meta["ip"] == b"198.51.100.9"   # what the worker's per-address quotas count
            nursery.cancel_scope.cancel()
    trio.run(main)
