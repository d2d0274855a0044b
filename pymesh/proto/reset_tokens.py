"""QUIC stateless reset tokens derived from a node's identity (RFC 9000 section 10.3).

A node that restarts with the same identity and port has lost every connection's state,
so a peer that keeps sending on an old connection would otherwise wait out its idle
timeout. The token a node gives out for each of its connection IDs is
``HMAC-SHA256(secret, cid)[:16]`` with ``secret`` derived from its Ed25519 private key:
the restarted process computes the same token for a connection ID it never saw and
answers the first packet with a Stateless Reset, which the old peer recognises and
tears the connection down at once.

Pure functions (no I/O): the endpoint does the sending, rate limiting and matching.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Callable

TOKEN_SIZE = 16
#: the smallest Stateless Reset: one header byte, four unpredictable bytes, the token
MIN_RESET_SIZE = 21
#: the largest we send; RFC 9000 suggests mimicking a short packet, 43 bytes is one with
#: a 20-byte connection ID and a small payload
MAX_RESET_SIZE = 43
_LABEL = b"pymesh/quic stateless reset/v1"


def reset_secret(private_key_raw: bytes) -> bytes:
    """The per-identity secret behind every reset token (never the key itself)."""
    return hmac.new(private_key_raw, _LABEL, hashlib.sha256).digest()


class ResetTokens:
    """Stateless reset tokens for connection IDs, from one secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def token(self, cid: bytes) -> bytes:
        return hmac.new(self._secret, cid, hashlib.sha256).digest()[:TOKEN_SIZE]


def build_reset(token: bytes, trigger_size: int, random_bytes: Callable[[int], bytes] = os.urandom) -> bytes | None:
    """A Stateless Reset answering a packet of ``trigger_size`` bytes, or None when a reset
    would not be strictly smaller than it (the rule that ends reset loops between two
    endpoints that both lost state, and keeps a reset from amplifying anything)."""
    size = min(trigger_size - 1, MAX_RESET_SIZE)
    if size < MIN_RESET_SIZE:
        return None
    body = bytearray(random_bytes(size - TOKEN_SIZE))
    body[0] = 0x40 | (body[0] & 0x3F)   # a short header: form bit 0, fixed bit 1
    return bytes(body) + token


def reset_token_untrusted(datagram: bytes) -> bytes | None:
    """The token a datagram would carry if it were a Stateless Reset (its last 16 bytes),
    or None when it cannot be one (a long header or fewer than 21 bytes)."""
    if len(datagram) < MIN_RESET_SIZE or datagram[0] & 0x80 or not datagram[0] & 0x40:
        return None
    return datagram[-TOKEN_SIZE:]
