"""Dial-back reachability check: the KRPC extension query ``pm_dialback`` and its probe.

A node that wants to know whether strangers can reach it asks another node::

    pm_dialback        a = {id, nonce}       -> r = {id, sent: 1}     (the usual "ip" key too)

The answering node then sends ONE datagram, from a fresh socket on an ephemeral port
(not its DHT socket), to the address it saw the query come from::

    pm_dialback_probe  a = {id, nonce}, ro=1   (no reply expected; never routed)

A NAT that lets in only replies from the address:port the requester contacted drops the
probe, so "the probe with my nonce arrived" means "an unsolicited sender reached me".
The request names no address: the probe goes only to the query's observed source, so
the check cannot be aimed at a third party. Spoofed sources are bounded by
:class:`DialbackLimiter`: one probe per source IP per ``interval`` seconds (a bounded
table that refuses rather than forgets a recent IP when full) and a global rate.

Parsers raise only :class:`~pymesh.proto.krpc.KRPCError`.
"""

from __future__ import annotations

from collections import OrderedDict

from pymesh.proto import krpc
from pymesh.proto.bencode import Value
from pymesh.proto.krpc import KRPCError

DIALBACK = b"pm_dialback"
PROBE = b"pm_dialback_probe"
NONCE_LEN = 16
#: Transaction id of a probe (nothing answers it).
PROBE_TID = b"pb"


def parse_nonce_untrusted(args: dict[bytes, Value]) -> bytes:
    """The ``nonce`` of a pm_dialback query or probe: exactly 16 bytes. Raises KRPCError."""
    nonce = args.get(b"nonce")
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_LEN:
        raise KRPCError(f"argument 'nonce' must be a {NONCE_LEN}-byte string")
    return nonce


def encode_probe(node_id: bytes, nonce: bytes, *, client: bytes | None = None) -> bytes:
    """The probe datagram: a read-only query, so the receiver adds no contact for it."""
    return krpc.encode_query(PROBE_TID, PROBE, {b"id": node_id, b"nonce": nonce}, read_only=True, client=client)


class DialbackLimiter:
    """One probe per source IP every ``interval`` seconds, and at most ``rate`` probes per
    second overall (``burst`` at once). The per-IP table holds at most ``max_ips``
    entries; when every entry is still recent, new IPs are refused until one ages out.
    The key is any string: hole punching (``pymesh.net.punch``) keys it by peer."""

    def __init__(self, *, interval: float = 10.0, rate: float = 20.0, burst: float = 20.0,
                 max_ips: int = 4096) -> None:
        self.interval = interval
        self.rate = rate
        self.burst = burst
        self.max_ips = max_ips
        self._last: OrderedDict[str, float] = OrderedDict()  # ip -> when its last probe went, oldest first
        self._tokens = burst
        self._refill_at: float | None = None
        self.refused = 0

    def __len__(self) -> int:
        return len(self._last)

    def allow(self, ip: str, now: float) -> bool:
        while self._last:
            oldest_ip, at = next(iter(self._last.items()))
            if now - at < self.interval:
                break
            del self._last[oldest_ip]
        if self._refill_at is not None:
            self._tokens = min(self.burst, self._tokens + max(0.0, now - self._refill_at) * self.rate)
        self._refill_at = now
        if ip in self._last or len(self._last) >= self.max_ips or self._tokens < 1.0:
            self.refused += 1
            return False
        self._tokens -= 1.0
        self._last[ip] = now
        return True


__all__ = ["DIALBACK", "PROBE", "NONCE_LEN", "DialbackLimiter", "encode_probe", "parse_nonce_untrusted"]
