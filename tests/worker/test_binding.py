"""Sessions bound to their client and previous hop; link failures reported at once; the link
check; the allowlist. In-process echo workers over memory streams, virtual clock."""

from __future__ import annotations

import pytest
import trio

from pymesh.net.rpc import RemoteError
from pymesh.proto import session_wire as wire
from pymesh.proto.allowlist import PeerAllowlist
from pymesh.proto.session_wire import ErrorCode, NextHop
from tests.worker.harness import Directory, MemNet, blob, run, step

pytestmark = pytest.mark.timeout(60)
SID = b"b" * 16


async def _route(net: MemNet, directory: Directory, **kwargs: object) -> tuple[object, object, object, object]:
    """Client -> W1 (0-2) -> W2 (2-4), opened with prev named: (w1, w2, client node, inbox)."""
    w1 = await net.worker(0, 2, directory, **kwargs)
    w2 = await net.worker(2, 4, directory, **kwargs)
    client, inbox = await net.client()
    c1, c2 = await net.connect(client, w1.peer), await net.connect(client, w2.peer)
    await c2.call(wire.OPEN, wire.Open(SID, 32, prev=w1.peer).to_meta())
    await c1.call(wire.OPEN, wire.Open(SID, 32, next_hop=NextHop(w2.peer, 2, 4)).to_meta())
    return w1, w2, client, inbox


def test_steps_are_accepted_only_from_the_bound_previous_hop() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w1, w2, client, inbox = await _route(net, directory)
            c1, c2 = await net.connect(client, w1.peer), await net.connect(client, w2.peer)
            await c1.push(wire.STEP, step(SID, 0, 0), [blob(1.0)])
            await inbox.wait(2)
            assert {o.start for o in inbox.outs()} == {0, 2} and w2.counters["steps"] == 1
            # A stranger who learnt the session id pushes a "retry" to the second hop: refused,
            # told so itself, nothing computed, and the client hears nothing of it.
            mallory, m_inbox = await net.client()
            m2 = await net.connect(mallory, w2.peer)
            await m2.push(wire.STEP, step(SID, 0, 0), [blob(9.0)])
            await m_inbox.wait(1)
            assert m_inbox.errors()[0].code == ErrorCode.BAD_REQUEST and w2.counters["steps"] == 1
            # The client itself may not push to a hop whose previous hop is a worker either.
            await c2.push(wire.STEP, step(SID, 1, 1), [blob(2.0)])
            await inbox.wait(3)
            err = inbox.errors()[-1]
            assert err.code == ErrorCode.BAD_REQUEST and "previous hop" in err.msg and w2.counters["steps"] == 1
            # Per-session counters answer only the session's client; worker-wide ones anyone.
            theirs, _ = await m2.call(wire.STATS, wire.Stats(SID).to_meta())
            mine, _ = await c2.call(wire.STATS, wire.Stats(SID).to_meta())
            assert wire.StatsReply.from_meta_untrusted(theirs).session is None
            assert wire.StatsReply.from_meta_untrusted(theirs).steps == 1
            assert wire.StatsReply.from_meta_untrusted(mine).session is not None
            # A stranger's pm.err to the first hop is dropped (only the next hop may report).
            n = len(inbox.items)
            m1 = await net.connect(mallory, w1.peer)
            bogus = wire.Err(SID, 0, ErrorCode.INTERNAL, "blame w2", 2, 4, w2.peer)
            await m1.push(wire.ERR, bogus.to_meta())
            await trio.sleep(1)
            assert len(inbox.items) == n
            nursery.cancel_scope.cancel()

    run(main)


def test_relinking_names_the_new_previous_hop() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w1, w2, client, inbox = await _route(net, directory)
            c2 = await net.connect(client, w2.peer)
            # The client routes around w1 and pushes to w2 itself: it relinks w2 naming no
            # previous hop (a hop cannot be its own).
            with pytest.raises(RemoteError, match="prev names this worker"):
                await c2.call(wire.SET_NEXT, wire.SetNext(SID, None, prev=w2.peer).to_meta())
            await c2.call(wire.SET_NEXT, wire.SetNext(SID, None).to_meta())
            await c2.push(wire.STEP, step(SID, 0, 0), [blob(1.0)])
            await inbox.wait(1)
            assert inbox.outs()[0].final and w2.counters["steps"] == 1
            # Only the client may relink: a stranger's SetNext is refused.
            mallory, _ = await net.client()
            m2 = await net.connect(mallory, w2.peer)
            with pytest.raises(RemoteError, match="only the client"):
                await m2.call(wire.SET_NEXT, wire.SetNext(SID, None, prev=mallory.peer_id).to_meta())
            nursery.cancel_scope.cancel()

    run(main)


def test_an_undeliverable_push_is_reported_at_once_as_a_link_failure() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w1, w2, client, inbox = await _route(net, directory)
            c1 = await net.connect(client, w1.peer)
            # w1's link to w2 dies (w2's process is gone; it restarts later under the same key).
            for conn in w1.node.connections():
                if conn.peer == w2.peer:
                    await conn.aclose()
            net.down.add(w2.peer)
            t0 = trio.current_time()
            await c1.push(wire.STEP, step(SID, 0, 0), [blob(1.0)])
            await inbox.wait(1)
            err = inbox.errors()[0]
            assert err.code == ErrorCode.NEXT_UNREACHABLE and err.blame == w2.peer and err.link
            assert trio.current_time() - t0 < w1.settings.next_hop_timeout + 1   # not the step timeout
            # The link check says the same, and only to the session's client.
            reply, _ = await c1.call(wire.LINK, wire.CheckLink(SID).to_meta())
            assert not wire.CheckLinkReply.from_meta_untrusted(reply).ok
            mallory, _ = await net.client()
            with pytest.raises(RemoteError, match="only the client"):
                await (await net.connect(mallory, w1.peer)).call(wire.LINK, wire.CheckLink(SID).to_meta())
            net.down.discard(w2.peer)
            reply, _ = await c1.call(wire.LINK, wire.CheckLink(SID).to_meta())
            assert wire.CheckLinkReply.from_meta_untrusted(reply).ok
            c2 = await net.connect(client, w2.peer)
            reply, _ = await c2.call(wire.LINK, wire.CheckLink(SID).to_meta())
            assert wire.CheckLinkReply.from_meta_untrusted(reply).ok          # the last hop
            nursery.cancel_scope.cancel()

    run(main)


def test_next_hop_checks_self_and_hides_why_a_dial_failed() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w1 = await net.worker(0, 2, directory)
            w2 = await net.worker(2, 4, directory)
            directory.entries[w1.peer] = (2, 4, directory.entries[w1.peer][2])   # a stale record of w1
            client, _ = await net.client()
            c1 = await net.connect(client, w1.peer)
            with pytest.raises(RemoteError, match="itself"):
                await c1.call(wire.OPEN, wire.Open(SID, 8, next_hop=NextHop(w1.peer, 2, 4)).to_meta())
            net.down.add(w2.peer)
            with pytest.raises(RemoteError) as info:
                await c1.call(wire.OPEN, wire.Open(SID, 8, next_hop=NextHop(w2.peer, 2, 4)).to_meta())
            assert info.value.code == ErrorCode.NEXT_UNREACHABLE
            assert "nobody answers" not in info.value.message and "mem" not in info.value.message
            assert w1.table.sessions == {}
            nursery.cancel_scope.cancel()

    run(main)


def test_the_allowlist_limits_clients_and_next_hops() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            client, inbox = await net.client()
            w2 = await net.worker(2, 4, directory)
            w3 = await net.worker(2, 4, directory)
            listed = PeerAllowlist.of([client.peer_id, w2.peer])
            w1 = await net.worker(0, 2, directory, allow_peers=listed)
            c1 = await net.connect(client, w1.peer)
            with pytest.raises(RemoteError) as info:
                await c1.call(wire.OPEN, wire.Open(SID, 8, next_hop=NextHop(w3.peer, 2, 4)).to_meta())
            assert info.value.code == ErrorCode.NEXT_UNKNOWN and "allowlist" in info.value.message
            await c1.call(wire.OPEN, wire.Open(SID, 8, next_hop=NextHop(w2.peer, 2, 4)).to_meta())
            stranger, s_inbox = await net.client()
            s1 = await net.connect(stranger, w1.peer)
            with pytest.raises(RemoteError) as info:
                await s1.call(wire.OPEN, wire.Open(b"x", 8).to_meta())
            assert info.value.code == ErrorCode.NOT_LISTED and "allowlist" in info.value.message
            await s1.push(wire.STEP, step(SID, 0, 0), [blob(1.0)])
            await s_inbox.wait(1)
            assert s_inbox.errors()[0].code == ErrorCode.BAD_REQUEST and w1.counters["steps"] == 0
            nursery.cancel_scope.cancel()

    run(main)


def test_a_push_lost_with_its_connection_is_reported_as_a_link_failure() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w1, w2, client, inbox = await _route(net, directory)

            async def black_hole(conn: object, meta: object, tensors: object) -> None:
                pass                     # the process that got the step dies before handling it

            w2.node.on_push(wire.STEP, black_hole)
            await (await net.connect(client, w1.peer)).push(wire.STEP, step(SID, 0, 0), [blob(1.0)])
            await trio.sleep(1)
            assert inbox.errors() == [] and [o.start for o in inbox.outs()] == [0]   # w1's copy only
            t0 = trio.current_time()
            for conn in w2.node.connections():
                if conn.peer == w1.peer:
                    await conn.aclose()  # ...and its connections end (a TCP RST, a QUIC stateless reset)
            await inbox.wait(2, timeout=10)
            err = inbox.errors()[0]
            assert err.code == ErrorCode.NEXT_UNREACHABLE and err.link and err.blame == w2.peer and err.step == 0
            assert trio.current_time() - t0 < 2
            nursery.cancel_scope.cancel()

    run(main)
