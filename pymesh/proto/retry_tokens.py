"""QUIC Retry tokens: address validation before a server spends state on a handshake.

Under load the endpoint answers an Initial with a Retry carrying a token; a client at a
real address echoes it in its next Initial, a spoofed source never sees it. The token is
``version | issued_ms | len(odcid) | odcid | HMAC(secret, address | issued | odcid | scid)[:16]``:
bound to the client's address, to the connection ID the Retry chose (the client's new
destination), and to the time, so it is useless from elsewhere or after ``lifetime``.
An HMAC instead of aioquic's RSA token handler: a Retry costs one hash, not an RSA
encryption, which matters exactly when the endpoint is flooded.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from pymesh.errors import RemoteProtocolError

_HEAD = struct.Struct(">BQB")   # format version, issue time (ms), original DCID length
_VERSION = 1
_MAC = 16
MAX_CID = 20
MAX_TOKEN = _HEAD.size + MAX_CID + _MAC


class BadRetryToken(RemoteProtocolError):
    """A Retry token that is malformed, forged, expired or from another address."""


class RetryTokens:
    def __init__(self, secret: bytes | None = None, lifetime: float = 10.0) -> None:
        self._secret = secret if secret is not None else os.urandom(32)
        self.lifetime = lifetime

    def _mac(self, address: bytes, head: bytes, odcid: bytes, scid: bytes) -> bytes:
        msg = b"".join([struct.pack(">B", len(address)), address, head, odcid, scid])
        return hmac.new(self._secret, msg, hashlib.sha256).digest()[:_MAC]

    def issue(self, address: bytes, odcid: bytes, scid: bytes, now: float) -> bytes:
        """A token for a client at ``address`` whose first Initial went to ``odcid``,
        sent in a Retry whose source connection ID is ``scid``."""
        if len(odcid) > MAX_CID:
            raise ValueError(f"connection ID of {len(odcid)} bytes; QUIC allows at most {MAX_CID}")
        head = _HEAD.pack(_VERSION, max(0, int(now * 1000)), len(odcid))
        return head + odcid + self._mac(address, head, odcid, scid)

    def validate_untrusted(self, token: bytes, address: bytes, dcid: bytes, now: float) -> bytes:
        """The original destination connection ID of a valid token echoed from ``address`` in
        an Initial sent to ``dcid``; BadRetryToken otherwise."""
        if not _HEAD.size + _MAC <= len(token) <= MAX_TOKEN:
            raise BadRetryToken(f"retry token of {len(token)} bytes; expected {_HEAD.size + _MAC}..{MAX_TOKEN}")
        version, issued_ms, n = _HEAD.unpack_from(token)
        if version != _VERSION or len(token) != _HEAD.size + n + _MAC:
            raise BadRetryToken("retry token of an unknown format or with a wrong length field")
        head, odcid, mac = token[:_HEAD.size], token[_HEAD.size:_HEAD.size + n], token[_HEAD.size + n:]
        if not hmac.compare_digest(mac, self._mac(address, head, odcid, dcid)):
            raise BadRetryToken("retry token not issued by this endpoint for this address and connection ID")
        age = now - issued_ms / 1000
        if not 0 <= age <= self.lifetime:
            raise BadRetryToken(f"retry token {age:.1f} s old; valid for {self.lifetime} s")
        return odcid


def address_bytes(addr: object) -> bytes:
    """A stable byte form of a socket address (host and port) for binding tokens to it."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}|{addr[1]}".encode("utf-8", "replace")
    return repr(addr).encode("utf-8", "replace")
