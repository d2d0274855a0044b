"""The sans-I/O DHT node: answers KRPC queries and keeps the routing table and stores.

:class:`DHTCore` is what both the trio node (``pymesh.net.dht``) and the in-process
simulator drive. It takes datagrams in (``receive``) and hands reply datagrams and
"ping this node" decisions out; the caller owns sockets, transaction matching and
timers. ``now`` is unix time in seconds (record timestamps are compared with it).

Methods answered: BEP 5 ``ping``, ``find_node``, ``get_peers``, ``announce_peer``;
BEP 44 ``get``, ``put``; and pymesh's extension queries in the same envelope:

``pm_put``  a = {id, target, rec, token}               -> r = {id, stored: 0|1}
``pm_get``  a = {id, target, [b], [after], [token]}    -> r = {id, token, nodes, recs, [next]}
``pm_dialback`` a = {id, nonce}                        -> r = {id, sent: 1}, and one probe

Reachability (:mod:`pymesh.proto.observed`, :mod:`pymesh.proto.dialback`): the ``ip`` a
verified response carries (the address its sender saw) feeds ``core.observed``, which
believes a public address only when several peers agree. A ``pm_dialback`` query makes
the core hand out (``Incoming.probe``) one ``pm_dialback_probe`` datagram for the query's
source address, which the driver sends from a fresh socket; rate limited per source IP.
A probe that arrives comes out as ``Incoming.probe_nonce`` (never answered, never routed).

Reflection: a ``pm_get`` whose ``token`` is not valid for its source address and target
comes from an address that has not proven it receives there (it may be spoofed). Its
reply carries only as many records as keep the whole reply within
``AMPLIFICATION`` x the query's size (id, token and nodes, what any BEP 5 node answers,
always go), so a spoofed query cannot make this node flood a victim. Readers pad the
queries of a lookup to :data:`READ_QUERY_SIZE` bytes (a full first page at 3x) and send
the token they were given with every further page. ``next`` is present while records
remain; an unverified reply that had room for none repeats the caller's cursor.

A *read-only* core (BEP 43) sends ``ro=1`` in its queries and answers none: nodes
that only look things up (a client, the monitor) stay out of everyone's routing tables,
so they leave no dead contacts behind. Receivers never add an ``ro`` sender.

The core also remembers contacts that recently failed to answer (:meth:`note_slow`,
:meth:`note_timeout`); lookups skip them (:meth:`recently_failed`) until they are heard
from again or ``failed_for`` seconds pass, so a dead node costs at most one wait.

``rec`` is a signed :class:`~pymesh.proto.records.WorkerRecord`; a node verifies the
signature and protocol version before it stores a record and never returns one it did
not verify. ``target`` must be the record's model target or ``ALL_TARGET``. ``b``
filters to records covering block b; ``after`` is the paging cursor from ``next``.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass, field

from pymesh import PROTOCOL_VERSION
from pymesh.proto import dialback, krpc
from pymesh.proto.bencode import decode_untrusted
from pymesh.proto.identity import verify_signature
from pymesh.proto.krpc import Addr, Contact, ErrorReply, KRPCError, Query, Response
from pymesh.proto.observed import ObservedAddress
from pymesh.proto.records import ALL_TARGET, RecordError, RecordVersionMismatch, WorkerRecord, model_target
from pymesh.proto.routing import K, RoutingTable
from pymesh.proto.storage import ItemStore, PeerStore, RecordStore, StoredRecord, immutable_target, mutable_target
from pymesh.proto.tokens import TokenManager

log = logging.getLogger(__name__)

CLIENT_VERSION = b"PM\x00\x01"
#: Clock difference tolerated between a record's signer and the node storing it.
MAX_SKEW = 60.0
#: Room left for records in a pm_get reply after id, token and nodes.
RECORD_PAGE_BUDGET = 950
#: How long a contact that failed to answer is skipped by lookups (unless heard from).
FAILED_FOR = 300.0
MAX_FAILED = 4096
#: A reply to an unverified source is at most this many times its query (QUIC's limit).
AMPLIFICATION = 3
#: Size readers pad pm_get lookup queries to: 3 x 480 bytes leaves room for a full page.
READ_QUERY_SIZE = 480


@dataclass
class Incoming:
    """What one received datagram produced."""

    reply: bytes | None = None                      # send back to the source
    message: Response | ErrorReply | None = None    # match against outstanding queries
    pings: list[Contact] = field(default_factory=list)
    error: str | None = None                        # why the datagram was dropped / refused
    probe: tuple[Addr, bytes] | None = None         # send from a fresh socket (dial-back)
    probe_nonce: bytes | None = None                # a dial-back probe arrived with this nonce


class DHTCore:
    def __init__(self, node_id: bytes, *, now: float, k: int = K, record_ttl: float = 300.0,
                 rng: random.Random | None = None, token_rotate: float = 300.0,
                 read_only: bool = False, failed_for: float = FAILED_FOR) -> None:
        self.node_id = node_id
        self.read_only = read_only
        self.failed_for = failed_for
        self._failed: OrderedDict[Contact, float] = OrderedDict()
        self.k = k
        self.record_ttl = record_ttl
        # Unseeded, use the OS's randomness: transaction ids and token secrets must not be
        # predictable. Simulations pass a seeded Random for repeatable runs.
        self._rng = rng or random.SystemRandom()
        self.routing = RoutingTable(node_id, now=now, k=k, rng=self._rng)
        self.tokens = TokenManager(now=now, rotate_every=token_rotate,
                                   random_bytes=lambda n: self._rng.getrandbits(8 * n).to_bytes(n, "big"))
        self.peers = PeerStore()
        self.items = ItemStore()
        # The secret that orders sources in record pages: the OS's randomness, except in a
        # seeded simulation (repeatable, and leaves the seeded generator's sequence alone).
        self.records = RecordStore(salt=None if rng is None else hashlib.sha256(b"pm-order" + node_id).digest()[:16])
        self._tid = self._rng.randrange(1 << 16)
        self.observed = ObservedAddress()
        self.dialback_limiter = dialback.DialbackLimiter()

    # -- outgoing ------------------------------------------------------------------------
    def next_tid(self) -> bytes:
        """A 4-byte transaction id: a counter (no reuse among recent queries) and 16
        random bits (a spoofed reply must guess them)."""
        self._tid = (self._tid + 1) & 0xFFFF
        return self._tid.to_bytes(2, "big") + self._rng.getrandbits(16).to_bytes(2, "big")

    def make_query(self, method: bytes, args: dict[bytes, object] | None = None) -> tuple[bytes, bytes]:
        """(transaction id, datagram) of a query from this node."""
        tid = self.next_tid()
        a: dict[bytes, object] = {b"id": self.node_id}
        a.update(args or {})
        return tid, krpc.encode_query(tid, method, a, read_only=self.read_only, client=CLIENT_VERSION)

    def note_response(self, contact: Contact, now: float, seen: Addr | None = None) -> list[Contact]:
        """``contact`` answered one of our queries; ``seen`` is the address it says it saw
        us at (BEP 42 ``ip``), a report for :attr:`observed`."""
        self._failed.pop(contact, None)
        if seen is not None:
            self.observed.report(contact.node_id, contact.addr, seen, now)
        return self._worth_pinging(self.routing.heard_from(contact, now, responded=True), now)

    def _worth_pinging(self, pings: list[Contact], now: float) -> list[Contact]:
        """The routing table's "ping this node" decisions, except for nodes that just
        failed to answer: those count as failed again (a waiting replacement takes
        their place) instead of costing another timeout."""
        out = []
        for c in pings:
            if self.recently_failed(c, now):
                self.routing.on_timeout(c.node_id, now)
            else:
                out.append(c)
        return out

    def note_slow(self, contact: Contact, now: float) -> None:
        """``contact`` did not answer within a lookup's soft timeout: skip it in lookups
        (an answer arriving later clears this)."""
        self._failed.pop(contact, None)
        self._failed[contact] = now
        if len(self._failed) > MAX_FAILED:
            self._failed.popitem(last=False)

    def note_timeout(self, node_id: bytes, now: float, addr: Addr | None = None) -> None:
        """A query to ``node_id`` went unanswered for the whole RPC timeout."""
        self.routing.on_timeout(node_id, now)
        if addr is not None:
            self.note_slow(Contact(node_id, addr), now)

    def recently_failed(self, contact: Contact, now: float) -> bool:
        at = self._failed.get(contact)
        if at is None:
            return False
        if now - at >= self.failed_for:
            del self._failed[contact]
            return False
        return True

    # -- incoming ------------------------------------------------------------------------
    def receive(self, data: bytes, src: Addr, now: float) -> Incoming:
        """Handle one datagram from ``src``. Never raises for bad input."""
        try:
            msg = krpc.decode_message_untrusted(data)
        except KRPCError as exc:
            tid = _salvage_tid(data)
            if tid is None:
                return Incoming(error=str(exc))
            return Incoming(reply=krpc.encode_error(tid, exc.code, str(exc)), error=str(exc))
        if not isinstance(msg, Query):
            return Incoming(message=msg)
        if msg.method == dialback.PROBE:  # never answered, never routed (it comes from a throwaway port)
            try:
                return Incoming(probe_nonce=dialback.parse_nonce_untrusted(msg.args))
            except KRPCError as exc:
                return Incoming(error=str(exc))
        if self.read_only:  # BEP 43: a read-only node does not answer queries
            return Incoming()
        pings: list[Contact] = []
        if not msg.read_only:
            self._failed.pop(Contact(msg.sender_id, src), None)
            pings = self._worth_pinging(self.routing.heard_from(Contact(msg.sender_id, src), now,
                                                                responded=False), now)
        probe = None
        try:
            if msg.method == dialback.DIALBACK:
                values, probe = self._pm_dialback(msg.args, src, now)
            else:
                values = self._dispatch(msg, src, now)
        except KRPCError as exc:
            return Incoming(reply=krpc.encode_error(msg.tid, exc.code, str(exc)), pings=pings, error=str(exc))
        return Incoming(reply=krpc.encode_response(msg.tid, values, seen=src, client=CLIENT_VERSION),
                        pings=pings, probe=probe)

    def _dispatch(self, q: Query, src: Addr, now: float) -> dict[bytes, object]:
        if q.method == b"pm_get":
            return self._pm_get(q, src, now)
        handler = _HANDLERS.get(q.method)
        if handler is None:
            raise KRPCError(f"method {q.method[:32]!r} unknown", krpc.METHOD_UNKNOWN)
        return handler(self, q.args, src, now)

    def _nodes(self, target: bytes) -> bytes:
        return krpc.pack_nodes(self.routing.closest(target, self.k))

    # -- BEP 5 ---------------------------------------------------------------------------
    def _ping(self, a: dict, src: Addr, now: float) -> dict[bytes, object]:  # type: ignore[type-arg]
        return {b"id": self.node_id}

    def _find_node(self, a: dict, src: Addr, now: float) -> dict[bytes, object]:  # type: ignore[type-arg]
        target = krpc.get_id20(a, b"target")
        return {b"id": self.node_id, b"nodes": self._nodes(target)}

    def _get_peers(self, a: dict, src: Addr, now: float) -> dict[bytes, object]:  # type: ignore[type-arg]
        ih = krpc.get_id20(a, b"info_hash")
        out: dict[bytes, object] = {b"id": self.node_id, b"token": self.tokens.issue(src[0], ih, now),
                                    b"nodes": self._nodes(ih)}
        peers = self.peers.get(ih, now, limit=50, rng=self._rng)
        if peers:
            out[b"values"] = [krpc.pack_addr(p) for p in peers]
        return out

    def _announce_peer(self, a: dict, src: Addr, now: float) -> dict[bytes, object]:  # type: ignore[type-arg]
        ih = krpc.get_id20(a, b"info_hash")
        token = krpc.get_bytes(a, b"token", krpc.MAX_TOKEN)
        assert token is not None
        port = src[1] if a.get(b"implied_port") == 1 else krpc.get_int(a, b"port", 1, 65535)
        if not self.tokens.check(token, src[0], ih, now):
            raise KRPCError("invalid or expired token; call get_peers first", krpc.PROTOCOL_ERROR)
        self.peers.add(ih, (src[0], port), now)
        return {b"id": self.node_id}

    # -- BEP 44 --------------------------------------------------------------------------
    def _get(self, a: dict, src: Addr, now: float) -> dict[bytes, object]:  # type: ignore[type-arg]
        target = krpc.get_id20(a, b"target")
        out: dict[bytes, object] = {b"id": self.node_id, b"token": self.tokens.issue(src[0], target, now),
                                    b"nodes": self._nodes(target)}
        item = self.items.get(target, now)
        if item is None:
            return out
        if item.key is None:
            out[b"v"] = decode_untrusted(item.v_raw)
            return out
        out[b"seq"] = item.seq
        want_seq = a.get(b"seq")
        if isinstance(want_seq, int) and item.seq is not None and item.seq <= want_seq:
            return out
        out[b"k"] = item.key
        out[b"sig"] = item.sig
        out[b"v"] = decode_untrusted(item.v_raw)
        return out

    def _put(self, a: dict, src: Addr, now: float) -> dict[bytes, object]:  # type: ignore[type-arg]
        p = krpc.parse_put_untrusted(a)
        if p.key is None:
            target = immutable_target(p.v_raw)
        else:
            target = mutable_target(p.key, p.salt)
        if not self.tokens.check(p.token, src[0], target, now):
            raise KRPCError("invalid or expired token; call get first", krpc.PROTOCOL_ERROR)
        if p.key is None:
            self.items.put_immutable(p.v_raw, now)
            return {b"id": self.node_id}
        assert p.sig is not None and p.seq is not None
        if not verify_signature(p.key, p.sig, krpc.mutable_sign_input(p.v_raw, p.seq, p.salt)):
            raise KRPCError("invalid signature", krpc.INVALID_SIGNATURE)
        err = self.items.put_mutable(p.key, p.salt, p.seq, p.sig, p.v_raw, p.cas, now)
        if err is not None:
            raise KRPCError(err[1], err[0])
        return {b"id": self.node_id}

    # -- pymesh records ------------------------------------------------------------------
    def _pm_put(self, a: dict, src: Addr, now: float) -> dict[bytes, object]:  # type: ignore[type-arg]
        target = krpc.get_id20(a, b"target")
        raw = krpc.get_bytes(a, b"rec", 1000)
        token = krpc.get_bytes(a, b"token", krpc.MAX_TOKEN)
        assert raw is not None and token is not None
        if not self.tokens.check(token, src[0], target, now):
            raise KRPCError("invalid or expired token; call pm_get for this target first")
        try:
            rec = WorkerRecord.from_bytes_untrusted(raw)
        except RecordVersionMismatch as exc:
            raise KRPCError(str(exc), krpc.PROTOCOL_ERROR) from None
        except RecordError as exc:
            code = krpc.INVALID_SIGNATURE if "signature" in str(exc) else krpc.PROTOCOL_ERROR
            raise KRPCError(f"record refused: {exc}", code) from None
        if target not in (ALL_TARGET, model_target(rec.model_id)):
            raise KRPCError("target is neither the record's model target nor the all-records target")
        if rec.timestamp < now - self.record_ttl or rec.timestamp > now + MAX_SKEW:
            raise KRPCError(f"record timestamp {rec.timestamp:.0f} is outside this node's window "
                            f"(now {now:.0f}, ttl {self.record_ttl:.0f}s); check the clock")
        expires = min(now + self.record_ttl, rec.timestamp + self.record_ttl + MAX_SKEW)
        stored = self.records.put(target, rec.peer_id.key,
                                  StoredRecord(raw, rec.timestamp, expires, rec.start, rec.stop, src[0]), now)
        return {b"id": self.node_id, b"stored": int(stored)}

    def _pm_get(self, q: Query, src: Addr, now: float) -> dict[bytes, object]:
        a = q.args
        target = krpc.get_id20(a, b"target")
        block = krpc.get_int(a, b"b", 0, 1 << 20) if b"b" in a else None
        after = krpc.get_bytes(a, b"after", 32, required=False) or b""
        token = krpc.get_bytes(a, b"token", krpc.MAX_TOKEN, required=False)
        out: dict[bytes, object] = {b"id": self.node_id, b"token": self.tokens.issue(src[0], target, now),
                                    b"nodes": self._nodes(target)}
        budget = RECORD_PAGE_BUDGET
        if token is None or not self.tokens.check(token, src[0], target, now):
            # the reply's size without records, with the largest transaction id and cursor
            bare = krpc.encode_response(b"t" * krpc.MAX_TID, {**out, b"recs": [], b"next": b"c" * max(12, len(after))},
                                        seen=src, client=CLIENT_VERSION)
            budget = min(budget, AMPLIFICATION * q.size - len(bare))
        recs, nxt = self.records.page(target, now, after=after, block=block, budget=max(0, budget))
        out[b"recs"] = recs
        if nxt is not None:
            out[b"next"] = nxt
        return out


    # -- reachability ----------------------------------------------------------------------
    def _pm_dialback(self, a: dict, src: Addr, now: float) -> tuple[dict[bytes, object], tuple[Addr, bytes]]:  # type: ignore[type-arg]
        """Probe the query's own source address (the request names none), rate limited."""
        nonce = dialback.parse_nonce_untrusted(a)
        if not self.dialback_limiter.allow(src[0], now):
            raise KRPCError(f"dial-back refused: one probe per address every "
                            f"{self.dialback_limiter.interval:.0f}s; ask again later or ask another node",
                            krpc.GENERIC_ERROR)
        probe = dialback.encode_probe(self.node_id, nonce, client=CLIENT_VERSION)
        return {b"id": self.node_id, b"sent": 1}, (src, probe)


def padded_read_args(node_id: bytes, args: dict[bytes, object], *, read_only: bool = False) -> dict[bytes, object]:
    """``args`` of a pm_get plus a ``pad`` that brings the query to about
    :data:`READ_QUERY_SIZE` bytes, so an unverified (first) reply may carry a full page."""
    probe = krpc.encode_query(b"t" * 4, b"pm_get", {b"id": node_id, **args, b"pad": b""},
                              read_only=read_only, client=CLIENT_VERSION)
    room = READ_QUERY_SIZE - len(probe)
    n = max(0, room - len(str(max(room, 0))))
    return {**args, b"pad": bytes(n)}


def _salvage_tid(data: bytes) -> bytes | None:
    """The transaction id of a malformed message, if one can be found cheaply."""
    i = data.find(b"1:t")
    if i < 0 or len(data) > krpc.MAX_DATAGRAM:
        return None
    j = data.find(b":", i + 3, i + 8)
    if j < 0:
        return None
    digits = data[i + 3:j]
    if not digits.isdigit() or int(digits) > krpc.MAX_TID:
        return None
    tid = data[j + 1:j + 1 + int(digits)]
    return tid if len(tid) == int(digits) else None


_HANDLERS = {
    b"ping": DHTCore._ping,
    b"find_node": DHTCore._find_node,
    b"get_peers": DHTCore._get_peers,
    b"announce_peer": DHTCore._announce_peer,
    b"get": DHTCore._get,
    b"put": DHTCore._put,
    b"pm_put": DHTCore._pm_put,
}

__all__ = ["DHTCore", "Incoming", "CLIENT_VERSION", "PROTOCOL_VERSION", "padded_read_args"]
