"""The trio DHT node: one UDP socket driving the sans-I/O :class:`DHTCore`.

One receive loop reads every datagram, drops what the per-IP rate limiter refuses,
hands queries to the core (which answers them) and matches responses to outstanding
queries by (transaction id, address). Lookups run the :class:`Lookup` state machine
with real queries and timeouts. ``async with DHTNode(...)`` binds, bootstraps and
runs maintenance (bucket refresh, re-bootstrap when the table is empty, a re-query of
bootstrap addresses that stopped answering so a restarted bootstrap re-learns the swarm,
record heartbeats); leaving the block
publishes "offline" versions of this node's records, then stops everything.

``read_only=True`` (BEP 43) is for nodes that only look things up and then leave (a
client run, the monitor, an observer): they send ``ro=1`` and answer no queries, so no
one adds them to a routing table and they leave no dead contacts behind.

Lookups give each query a soft timeout from measured round-trip times (at least
``min_rpc_timeout``, at most ``rpc_timeout``): past it the lookup moves on and the
contact is skipped by later lookups until it is heard from again, so a departed node
costs one short wait, not ``rpc_timeout`` on every lookup.

Reachability: the ``ip`` each answered query's response carries feeds ``core.observed``
(a public address believed only on agreement, :mod:`pymesh.proto.observed`);
``dialback_check(addr)`` asks a node to probe us from a fresh port
(:mod:`pymesh.net.dht_dialback`), and this node answers such requests the same way.

The pymesh record API (``publish_record``, ``find_block_providers``, ...) is the
:class:`~pymesh.net.dht_records.DHTRecords` component ``node.records``; the node's methods of
the same names delegate to it. Time comes from one injectable :class:`~pymesh.net.clock.Clock`
(``clock.wall()`` for what the sans-I/O core and records stamp, ``clock.monotonic()`` for
round trips), so tests run nodes under trio's virtual clock.
"""

from __future__ import annotations

import logging
import math
import socket as _socket
from types import TracebackType
from typing import Sequence

import trio

from pymesh.errors import ConfigError, PeerUnavailable
from pymesh.net.dht_ratelimit import RateLimiter
from pymesh.net.clock import Clock, TrioClock
from pymesh.net.dht_config import DHTConfig, DHTRemoteError
from pymesh.net.dht_bootstrap import Bootstrapper
from pymesh.net.dht_dialback import Dialback, DialbackResult
from pymesh.net.dht_ops import LookupResult
from pymesh.net.dht_records import DHTRecords
from pymesh.proto import krpc
from pymesh.proto.addr import PeerAddr
from pymesh.proto.bep44 import best_item_untrusted
from pymesh.proto.dht_core import DHTCore
from pymesh.proto.identity import Identity
from pymesh.proto.krpc import Addr, Contact, ErrorReply, KRPCError, Response
from pymesh.proto.lookup import Lookup, RttEstimator
from pymesh.proto.records import WorkerRecord

log = logging.getLogger(__name__)

__all__ = ["DHTNode", "DHTConfig", "DHTRemoteError"]


#: What a lookup query reports: (contact, response or None, past its soft timeout?).
_Report = tuple[Contact, Response | None, bool]


def _put(out: trio.MemorySendChannel[_Report], item: _Report) -> None:
    try:
        out.send_nowait(item)
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass  # the lookup has finished


class DHTNode:
    def __init__(self, identity: Identity, *, host: str = "0.0.0.0", port: int = 0,
                 bootstrap: Sequence[PeerAddr] = (), config: DHTConfig | None = None,
                 read_only: bool | None = None, clock: Clock | None = None) -> None:
        self.clock: Clock = clock if clock is not None else TrioClock()
        self.identity = identity
        self.node_id = identity.node_id
        self.host = host
        self.port = port
        self.bootstrap_addrs = list(bootstrap)
        self.config = config or DHTConfig()
        self.read_only = self.config.read_only if read_only is None else read_only
        self.core = DHTCore(self.node_id, now=self.clock.wall(), k=self.config.k,
                            record_ttl=self.config.record_ttl, read_only=self.read_only)
        self.rtt = RttEstimator(floor=min(self.config.min_rpc_timeout, self.config.rpc_timeout))
        self.limiter = RateLimiter(self.config.rate_limit, self.config.rate_burst)
        self._sock: trio.socket.SocketType | None = None
        self._nursery: trio.Nursery | None = None
        self._pending: dict[tuple[bytes, Addr], tuple[trio.Event, list[Response | ErrorReply]]] = {}
        self._pings = 0
        # timeouts: queries unanswered for rpc_timeout; slow: lookup queries past their soft
        # timeout; skipped: lookup candidates not queried because they recently failed
        self.stats = {"received": 0, "dropped": 0, "answered": 0, "malformed": 0,
                      "queries": 0, "timeouts": 0, "slow": 0, "skipped": 0}
        self.records = DHTRecords(self, self.clock)
        self.bootstrapper = Bootstrapper(self, self.clock, self.bootstrap_addrs)
        self.dialback = Dialback(self, host)

    # -- lifecycle -----------------------------------------------------------------------
    async def __aenter__(self) -> "DHTNode":
        raw = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        try:
            raw.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, 1 << 20)
        except OSError:
            pass
        raw.setblocking(False)
        self._raw = raw
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            await sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen for the DHT on udp {self.host}:{self.port}: {exc}; "
                              "choose another port (--dht-port / --port) or host") from None
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        self._nursery.start_soon(self._receive_loop)
        log.info("DHT node %s listening on udp %s:%d", self.identity.peer_id.short(), self.host, self.port)
        try:
            await self.bootstrap()
        except BaseException:
            await self._stop(None, None, None)
            raise
        self._nursery.start_soon(self._maintenance_loop)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        if exc_type is None or issubclass(exc_type, (Exception, KeyboardInterrupt)):
            with trio.move_on_after(self.config.offline_deadline + 0.5) as scope:
                scope.shield = True
                try:
                    await self.records.publish_offline()
                except Exception as err:
                    log.warning("could not publish offline records at shutdown: %s", err)
        return await self._stop(exc_type, exc, tb)

    async def _stop(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                    tb: TracebackType | None) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        try:
            return await self._nursery_cm.__aexit__(exc_type, exc, tb)
        finally:
            if self._sock is not None:
                self._sock.close()
            log.info("DHT node %s stopped", self.identity.peer_id.short())

    # -- socket --------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, src = await self._sock.recvfrom(krpc.MAX_DATAGRAM + 1)
            except OSError as exc:  # e.g. ICMP port unreachable surfaced on some systems
                log.debug("recvfrom failed: %s", exc)
                await trio.sleep(0.01)
                continue
            self.stats["received"] += 1
            now = self.clock.wall()
            src = (src[0], src[1])
            if not self.limiter.allow(src[0], now):
                self.stats["dropped"] += 1
                continue
            try:
                self._handle(data, src, now)
            except Exception:  # a bug must never kill the loop
                log.exception("error handling a datagram from %s:%d", *src)

    def _handle(self, data: bytes, src: Addr, now: float) -> None:
        inc = self.core.receive(data, src, now)
        if inc.error:
            self.stats["malformed"] += 1
            log.debug("from %s:%d: %s", src[0], src[1], inc.error)
        if inc.reply is not None:
            self.stats["answered"] += 1
            self._send_nowait(inc.reply, src)
        if inc.message is not None:
            waiter = self._pending.pop((inc.message.tid, src), None)
            if waiter is not None:
                waiter[1].append(inc.message)
                waiter[0].set()
        for c in inc.pings:
            self._spawn_ping(c)
        if inc.probe is not None:
            self.dialback.on_request(*inc.probe)
        if inc.probe_nonce is not None:
            self.dialback.on_probe(inc.probe_nonce, src)

    def _send_nowait(self, data: bytes, addr: Addr) -> None:
        try:
            self._raw.sendto(data, addr)  # non-blocking; a full buffer drops, as UDP may
        except (BlockingIOError, OSError) as exc:
            log.debug("send to %s:%d failed: %s", addr[0], addr[1], exc)

    async def query(self, addr: Addr, method: bytes, args: dict[bytes, object] | None = None, *,
                    node_id: bytes | None = None, timeout: float | None = None) -> Response:
        """Send one query and wait for its answer; raises PeerUnavailable on timeout and
        DHTRemoteError on an error reply."""
        tid, data = self.core.make_query(method, args)
        key = (tid, addr)
        event = trio.Event()
        box: list[Response | ErrorReply] = []
        self._pending[key] = (event, box)
        self.stats["queries"] += 1
        sent = self.clock.monotonic()
        try:
            self._send_nowait(data, addr)
            with trio.move_on_after(timeout or self.config.rpc_timeout):
                await event.wait()
        finally:
            self._pending.pop(key, None)
        now = self.clock.wall()
        if not box:
            self.stats["timeouts"] += 1
            if node_id is not None:
                self.core.note_timeout(node_id, now, addr)
            raise PeerUnavailable(f"DHT node {addr[0]}:{addr[1]} did not answer {method.decode()} "
                                  f"within {timeout or self.config.rpc_timeout:.1f}s")
        msg = box[0]
        self.rtt.observe(addr, self.clock.monotonic() - sent)
        if isinstance(msg, ErrorReply):
            raise DHTRemoteError(addr, msg.code, msg.message)
        for c in self.core.note_response(Contact(msg.sender_id, addr), now, seen=msg.seen_ip):
            self._spawn_ping(c)
        return msg

    def _spawn_ping(self, contact: Contact) -> None:
        if self._nursery is None or self._pings >= self.config.max_pending_pings:
            return
        self._pings += 1
        self._nursery.start_soon(self._ping_check, contact)

    async def _ping_check(self, contact: Contact) -> None:
        try:
            await self.query(contact.addr, b"ping", node_id=contact.node_id)
        except (PeerUnavailable, DHTRemoteError):
            pass
        finally:
            self._pings -= 1

    # -- lookups -------------------------------------------------------------------------
    async def lookup(self, target: bytes, method: bytes = b"find_node",
                     args: dict[bytes, object] | None = None) -> LookupResult:
        """Iterative lookup of ``target``: (k closest that answered, every reply by node id)."""
        if args is None:
            key = b"info_hash" if method == b"get_peers" else b"target"
            args = {key: target}
        lk = Lookup(target, self.core.routing.closest(target, 2 * self.config.k), k=self.config.k,
                    alpha=self.config.alpha, own_id=self.node_id,
                    skip=lambda c: self.core.recently_failed(c, self.clock.wall()))
        replies: dict[bytes, tuple[Contact, Response]] = {}
        send, recv = trio.open_memory_channel[_Report](math.inf)
        assert self._nursery is not None
        # Queries run in the node's nursery, not the lookup's: one that outlives the lookup
        # still ends in a response (routing update) or a timeout (the contact is marked).
        for c in lk.next_queries(self.clock.wall()):
            self._nursery.start_soon(self._lookup_query, c, method, args, send)
        try:
            while not lk.done and (lk.inflight or (lk.pending_slow and not lk.responses)):
                with trio.move_on_after(self.config.rpc_timeout + 1.0) as waited:
                    c, resp, slow = await recv.receive()
                if waited.cancelled_caught:  # every query reports within rpc_timeout: closing
                    break
                now = self.clock.wall()
                if slow:  # past its soft timeout: go on without it
                    if lk.on_slow(c.node_id, now):
                        self.stats["slow"] += 1
                        self.core.note_slow(c, now)
                elif resp is None or resp.sender_id != c.node_id:
                    lk.on_timeout(c.node_id, now)
                else:
                    try:
                        nodes = krpc.reply_nodes_untrusted(resp.values)
                    except KRPCError:
                        lk.on_timeout(c.node_id, now)
                    else:
                        replies[c.node_id] = (c, resp)
                        lk.on_response(c.node_id, nodes, now)
                for c in lk.next_queries(now):
                    self._nursery.start_soon(self._lookup_query, c, method, args, send)
        finally:
            send.close()
            self.stats["skipped"] += lk.skipped
        return lk.result(), replies

    async def _lookup_query(self, c: Contact, method: bytes, args: dict[bytes, object],
                            out: trio.MemorySendChannel[_Report]) -> None:
        """One lookup query: reports (c, None, True) to ``out`` at the soft timeout, then
        (c, response or None on timeout / error reply, False); nothing once the lookup is
        over."""
        soft = self.rtt.soft_timeout(c.addr, self.config.rpc_timeout)
        result: list[Response | None] = []

        async def watchdog() -> None:
            await trio.sleep(soft)
            if not result:
                _put(out, (c, None, True))

        async with trio.open_nursery() as nursery:
            if soft < self.config.rpc_timeout:
                nursery.start_soon(watchdog)
            try:
                result.append(await self.query(c.addr, method, args, node_id=c.node_id))
            except (PeerUnavailable, DHTRemoteError):
                result.append(None)
            nursery.cancel_scope.cancel()
        _put(out, (c, result[0], False))

    async def bootstrap(self) -> int:
        """See :meth:`Bootstrapper.bootstrap`; returns the routing table size."""
        return await self.bootstrapper.bootstrap()

    async def recheck_bootstraps(self, period: float) -> None:
        await self.bootstrapper.recheck(period)

    async def _maintenance_loop(self) -> None:
        period = max(0.2, min(self.config.heartbeat, 30.0))
        while True:
            await trio.sleep(period)
            try:
                if len(self.core.routing) == 0 and self.bootstrap_addrs:
                    await self.bootstrap()
                elif self.bootstrap_addrs and not self.read_only:
                    await self.recheck_bootstraps(period)
                now = self.clock.wall()
                for c in self.core.routing.questionable(now, limit=self.config.max_pending_pings):
                    self._spawn_ping(c)
                for target in self.core.routing.refresh_targets(now, after=self.config.refresh_interval):
                    await self.lookup(target)
                await self.records.heartbeat_records()
            except Exception:
                log.exception("DHT maintenance step failed; continuing")

    # -- reachability --------------------------------------------------------------------
    async def dialback_check(self, addr: Addr, *, timeout: float = 3.0) -> DialbackResult:
        """Ask the node at ``addr`` to probe us from a fresh port; see :mod:`pymesh.net.dht_dialback`."""
        return await self.dialback.check(addr, timeout=timeout)

    # -- BEP 5 / BEP 44 client operations ------------------------------------------------
    async def ping(self, addr: Addr) -> bytes:
        return (await self.query(addr, b"ping")).sender_id

    async def get_peers(self, info_hash: bytes) -> list[Addr]:
        _, replies = await self.lookup(info_hash, b"get_peers")
        peers: set[Addr] = set()
        for _, resp in replies.values():
            try:
                peers.update(krpc.reply_peers_untrusted(resp.values))
            except KRPCError:
                continue
        return sorted(peers)

    async def announce_peer(self, info_hash: bytes, port: int) -> int:
        closest, replies = await self.lookup(info_hash, b"get_peers")
        return await self.write_to(closest, replies, b"announce_peer",
                                    {b"info_hash": info_hash, b"port": port})

    async def write_to(self, closest: list[Contact], replies: dict[bytes, tuple[Contact, Response]],
                        method: bytes, args: dict[bytes, object]) -> int:
        """Send a token-carrying write to every node in ``closest``; count acceptances."""
        ok = 0

        async def one(c: Contact) -> None:
            nonlocal ok
            token = replies[c.node_id][1].values.get(b"token")
            if not isinstance(token, bytes):
                return
            try:
                await self.query(c.addr, method, {**args, b"token": token}, node_id=c.node_id)
                ok += 1
            except (PeerUnavailable, DHTRemoteError) as exc:
                log.debug("%s to %s:%d failed: %s", method.decode(), c.addr[0], c.addr[1], exc)

        async with trio.open_nursery() as nursery:
            for c in closest:
                nursery.start_soon(one, c)
        return ok

    async def put_mutable(self, identity: Identity, value: object, *, seq: int, salt: bytes = b"") -> int:
        """BEP 44 put of a signed mutable item to the k closest nodes (and locally)."""
        from pymesh.proto.bencode import encode
        from pymesh.proto.storage import mutable_target

        v_raw = encode(value)
        target = mutable_target(identity.public_key, salt)
        sig = identity.sign(krpc.mutable_sign_input(v_raw, seq, salt))
        self.core.items.put_mutable(identity.public_key, salt, seq, sig, v_raw, None, self.clock.wall())
        closest, replies = await self.lookup(target, b"get")
        args: dict[bytes, object] = {b"v": value, b"k": identity.public_key, b"sig": sig, b"seq": seq}
        if salt:
            args[b"salt"] = salt
        return await self.write_to(closest, replies, b"put", args)

    async def get_item(self, target: bytes, *, salt: bytes = b"") -> tuple[object, int | None] | None:
        """BEP 44 get: the (value, seq) with the highest verified seq, or None. For a
        mutable item pass the ``salt`` it was stored with (replies do not carry it)."""
        from pymesh.proto.bencode import decode_untrusted

        _, replies = await self.lookup(target, b"get")
        local = self.core.items.get(target, self.clock.wall())
        mine = None if local is None else (decode_untrusted(local.v_raw), local.seq)
        return best_item_untrusted((resp.values for _, resp in replies.values()), target, salt, mine)

    # -- worker records (the DHTRecords component) --------------------------------------
    async def publish_record(self, record: WorkerRecord) -> int:
        """See :meth:`DHTRecords.publish_record`."""
        return await self.records.publish_record(record)

    async def publish_offline(self) -> None:
        await self.records.publish_offline()

    async def heartbeat_records(self) -> None:
        await self.records.heartbeat_records()

    def stop_refreshing(self, model_id: str | None = None) -> None:
        self.records.stop_refreshing(model_id)

    async def find_block_providers(self, model_id: str, block: int) -> list[WorkerRecord]:
        return await self.records.find_block_providers(model_id, block)

    async def find_model_records(self, model_id: str) -> list[WorkerRecord]:
        return await self.records.find_model_records(model_id)

    async def list_records(self, model_id: str | None = None) -> list[WorkerRecord]:
        return await self.records.list_records(model_id)

    async def list_models(self) -> list[str]:
        return await self.records.list_models()
