"""Which new QUIC Initials a server endpoint lets take a pending-handshake slot.

A parseable Initial header is no proof of anything: before this gate a datagram with a
valid header and a garbage payload held one of the endpoint's pending slots until the
connect timeout, so a few dozen spoofed packets a second locked out every new connection.
Now an Initial takes a slot only if

0. its source address is within its budget of new Initials per second (a token bucket
   per address, checked before any cryptography: a flood from one address costs one
   dictionary lookup per datagram beyond the budget);
1. it decrypts with the Initial keys of its destination connection ID (checked here with
   aioquic's own crypto before any connection object exists: garbage costs one key
   derivation and one failed AEAD open, and leaves nothing behind);
2. its source address holds fewer than ``per_source`` pending handshakes;
3. while more than ``retry_above`` handshakes are pending (load), its source address is
   validated: the Initial echoes a Retry token this endpoint issued to that address
   (:mod:`pymesh.proto.retry_tokens`); a first Initial gets a Retry instead of a slot;
4. fewer than ``max_pending`` handshakes are pending in all.

Initial keys are public (derived from the packet's own connection ID), so an attacker can
still produce Initials that decrypt; from a real address (2) bounds them, from spoofed
ones (3) does, since the Retry goes to the spoofed address.
"""

from __future__ import annotations

import collections
import enum
import os
from dataclasses import dataclass
from typing import Any

from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicHeader, encode_quic_retry

from pymesh.net.dht_ratelimit import RateLimiter
from pymesh.proto.retry_tokens import BadRetryToken, RetryTokens, address_bytes

MAX_PENDING = 256
PER_SOURCE = 32
RETRY_ABOVE = 64
#: new Initials per second a source address may make the endpoint decrypt (and burst):
#: an honest node opens a handful of connections, each retransmitting its Initial rarely
SOURCE_RATE = 50.0
SOURCE_BURST = 100.0


class Verdict(enum.Enum):
    ACCEPT = "accept"
    RETRY = "retry"
    DROP = "drop"


@dataclass
class Decision:
    verdict: Verdict
    reply: bytes = b""                        # the Retry packet (RETRY)
    original_dcid: bytes = b""                # for the server connection (ACCEPT)
    retry_scid: bytes | None = None           # set when the client echoed our Retry (ACCEPT)


def initial_decrypts_untrusted(data: bytes, header: QuicHeader, payload_offset: int) -> bool:
    """Whether the first packet of ``data`` (an Initial whose header ``header`` was parsed
    up to ``payload_offset``) opens with the client Initial keys of its destination CID."""
    if header.version is None or header.packet_length > len(data):
        return False
    crypto = CryptoPair()
    try:
        crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
        crypto.decrypt_packet(data[:header.packet_length], payload_offset, 0)
    except ValueError:  # aioquic's CryptoError is one
        return False
    return True


def _source(addr: Any) -> str:
    """The host part of a socket address: budgets and caps are per address, not per port."""
    return str(addr[0] if isinstance(addr, tuple) else addr)


class InitialGate:
    """Pending-handshake accounting and the admission decision for new Initials."""

    def __init__(self, *, max_pending: int = MAX_PENDING, per_source: int = PER_SOURCE,
                 retry_above: int = RETRY_ABOVE, retry_tokens: RetryTokens | None = None,
                 source_rate: float = SOURCE_RATE, source_burst: float = SOURCE_BURST) -> None:
        self.max_pending = max_pending
        self._budget = RateLimiter(source_rate, source_burst)
        self.per_source = per_source
        self.retry_above = retry_above
        self.retry_tokens = retry_tokens or RetryTokens()
        self._pending: dict[object, str] = {}          # connection -> its source
        self._per_source: collections.Counter[str] = collections.Counter()
        #: what happened to new Initials: over_budget, undecryptable, retry_sent, bad_token,
        #: source_cap, full, accepted
        self.counters: collections.Counter[str] = collections.Counter()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_from(self, addr: Any) -> int:
        return self._per_source.get(_source(addr), 0)

    def within_budget(self, addr: Any, now: float) -> bool:
        """Whether ``addr`` may have one more new Initial examined now (step 0)."""
        if self._budget.allow(_source(addr), now):
            return True
        self.counters["over_budget"] += 1
        return False

    def decide_untrusted(self, data: bytes, header: QuicHeader, payload_offset: int, addr: Any,
                         now: float) -> Decision:
        if not initial_decrypts_untrusted(data, header, payload_offset):
            self.counters["undecryptable"] += 1
            return Decision(Verdict.DROP)
        original, retry_scid = header.destination_cid, None
        if header.token:
            try:
                original = self.retry_tokens.validate_untrusted(header.token, address_bytes(addr),
                                                                header.destination_cid, now)
            except BadRetryToken:
                self.counters["bad_token"] += 1
                return Decision(Verdict.DROP)
            retry_scid = header.destination_cid
        elif self.pending >= self.retry_above:
            assert header.version is not None
            scid = os.urandom(8)
            token = self.retry_tokens.issue(address_bytes(addr), header.destination_cid, scid, now)
            self.counters["retry_sent"] += 1
            return Decision(Verdict.RETRY, reply=encode_quic_retry(
                version=header.version, source_cid=scid, destination_cid=header.source_cid,
                original_destination_cid=header.destination_cid, retry_token=token))
        if self.pending_from(addr) >= self.per_source:
            self.counters["source_cap"] += 1
            return Decision(Verdict.DROP)
        if self.pending >= self.max_pending:
            self.counters["full"] += 1
            return Decision(Verdict.DROP)
        return Decision(Verdict.ACCEPT, original_dcid=original, retry_scid=retry_scid)

    def add(self, conn: object, addr: Any) -> None:
        """``conn`` (accepted) now holds a pending slot until :meth:`done`."""
        source = _source(addr)
        self._pending[conn] = source
        self._per_source[source] += 1
        self.counters["accepted"] += 1

    def done(self, conn: object) -> None:
        """``conn``'s handshake finished or failed: free its slot (idempotent)."""
        source = self._pending.pop(conn, None)
        if source is not None:
            self._per_source[source] -= 1
            if self._per_source[source] <= 0:
                del self._per_source[source]
