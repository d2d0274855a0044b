"""How a peer can be reached, as a worker's record says it, and the relay's circuit header.

A record's ``rc`` field (absent: the record's host and port answer directly) says one of:

- ``punch``: behind a NAT whose mapping looked stable (the same external port for every
  destination), so a QUIC dial may open a direct path if both sides send at once
  (:mod:`pymesh.net.punch`); ``addr`` is the worker's QUIC socket as a relay saw it. The
  relays are still listed: punching starts with an authenticated exchange through one.
- ``relay``: not reachable from outside; dial one of ``relays``.

Both list at most :data:`MAX_RELAYS` relays, each (peer key, host, port): the relay's TCP
port N, where circuits are opened (:data:`MAGIC` header). The record is signed by the
worker, so the relay list and the punch address are what the worker itself said; a dialer
still pins the worker's key in the end-to-end TLS handshake, so a relay that lies about
whom it connects to is caught there.

Circuit header (a dialer or a reserved peer to the relay, on a fresh TCP connection)::

    b"PMR1" + u16 length + bencode {op: b"c", t: <32-byte target key>}     (open a circuit)
                             bencode {op: b"a", c: <16-byte circuit id>}    (accept one)

answered by the relay with ``u8 status + u16 length + UTF-8 message`` (status 0: the bytes
that follow are the other end's; anything else: why not, then the relay closes). Both are
parsed here with size caps before anything is allocated; defects raise :class:`ReachError`.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from pymesh.errors import DecodeError
from pymesh.proto.bencode import BencodeError, decode_untrusted, encode

MAX_RELAYS = 2
MAX_HOST = 253
MAGIC = b"PMR1"
#: largest circuit request body (bencode) a relay reads
MAX_HEADER = 128
#: largest status message a dialer reads
MAX_STATUS = 512
CIRCUIT_ID_SIZE = 16
MODES = ("punch", "relay")
#: how a node decides its own reachability (``--reachability``): dial-back check, or told
REACHABILITY = ("auto", "public", "nat")
OP_CONNECT = b"c"
OP_ACCEPT = b"a"
STATUS_OK = 0
STATUS_REFUSED = 1
STATUS_NO_RESERVATION = 2
STATUS_OVER_QUOTA = 3


class ReachError(DecodeError):
    """A malformed reach field, circuit header or relay status."""


@dataclass(frozen=True)
class RelayAddr:
    """A relay a worker holds a reservation at: its key and the TCP address of its circuits."""

    peer_key: bytes
    host: str
    port: int

    def to_wire(self) -> list[object]:
        return [self.peer_key, self.host, self.port]


@dataclass(frozen=True)
class Reach:
    mode: str                                  # "punch" or "relay"
    relays: tuple[RelayAddr, ...] = ()
    punch_addr: tuple[str, int] | None = None  # the worker's QUIC socket, as a relay saw it

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"reach mode {self.mode!r} must be one of {MODES}")
        if not 0 < len(self.relays) <= MAX_RELAYS:
            raise ValueError(f"a {self.mode} record lists 1..{MAX_RELAYS} relays, not {len(self.relays)}")
        if self.mode == "punch" and self.punch_addr is None:
            raise ValueError("a punch record needs the worker's observed QUIC address")

    def to_wire(self) -> dict[bytes, object]:
        out: dict[bytes, object] = {b"m": self.mode, b"r": [r.to_wire() for r in self.relays]}
        if self.punch_addr is not None:
            out[b"a"] = [self.punch_addr[0], self.punch_addr[1]]
        return out

    @classmethod
    def from_wire_untrusted(cls, value: object) -> "Reach":
        if not isinstance(value, dict):
            raise ReachError("reach field must be a dictionary")
        if set(value) - {b"m", b"r", b"a"}:
            raise ReachError(f"reach field has unknown keys {sorted(set(value) - {b'm', b'r', b'a'})!r}")
        mode = value.get(b"m")
        if not isinstance(mode, bytes) or mode.decode("ascii", "replace") not in MODES:
            raise ReachError(f"reach mode must be one of {MODES}")
        relays = value.get(b"r")
        if not isinstance(relays, list) or not 0 < len(relays) <= MAX_RELAYS:
            raise ReachError(f"reach field must list 1..{MAX_RELAYS} relays")
        parsed = tuple(_relay_untrusted(r) for r in relays)
        addr = value.get(b"a")
        punch = addr_untrusted(addr) if addr is not None else None
        try:
            return cls(mode.decode("ascii"), parsed, punch)
        except ValueError as exc:
            raise ReachError(str(exc)) from None


def _ip_text_untrusted(value: object) -> str:
    if not isinstance(value, bytes) or not 0 < len(value) <= 45:
        raise ReachError("reach address host must be an IP address")
    try:
        return str(ipaddress.ip_address(value.decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        raise ReachError("reach address host must be an IP address") from None


def _port_untrusted(value: object) -> int:
    if not isinstance(value, int) or not 0 < value <= 65535:
        raise ReachError("reach address port must be in 1..65535")
    return value


def addr_untrusted(value: object) -> tuple[str, int]:
    """``[host, port]`` from the network, the host an IP address; ReachError otherwise."""
    if not isinstance(value, list) or len(value) != 2:
        raise ReachError("reach address must be [host, port]")
    return _ip_text_untrusted(value[0]), _port_untrusted(value[1])


def _relay_untrusted(value: object) -> RelayAddr:
    if not isinstance(value, list) or len(value) != 3:
        raise ReachError("a relay must be [key, host, port]")
    key = value[0]
    if not isinstance(key, bytes) or len(key) != 32:
        raise ReachError("a relay's key must be 32 bytes")
    host, port = addr_untrusted(value[1:])
    return RelayAddr(key, host, port)


# --------------------------------------------------------------------------- circuit header


@dataclass(frozen=True)
class CircuitRequest:
    op: bytes                       # OP_CONNECT or OP_ACCEPT
    target: bytes = b""             # OP_CONNECT: the reserved peer's key
    circuit: bytes = b""            # OP_ACCEPT: the id the relay pushed to the reserved peer


def encode_request(req: CircuitRequest) -> bytes:
    body: dict[bytes, object] = {b"op": req.op}
    if req.op == OP_CONNECT:
        body[b"t"] = req.target
    else:
        body[b"c"] = req.circuit
    raw = encode(body)
    return MAGIC + struct.pack(">H", len(raw)) + raw


def parse_request_length_untrusted(head: bytes) -> int:
    """The body length from the first 6 bytes (magic + u16); ReachError if not a circuit header."""
    if len(head) != 6 or head[:4] != MAGIC:
        raise ReachError("not a relay circuit header (expected magic PMR1)")
    n = int.from_bytes(head[4:], "big")
    if not 0 < n <= MAX_HEADER:
        raise ReachError(f"circuit header body of {n} bytes is outside 1..{MAX_HEADER}")
    return n


def parse_request_untrusted(body: bytes) -> CircuitRequest:
    if len(body) > MAX_HEADER:
        raise ReachError(f"circuit header body exceeds {MAX_HEADER} bytes")
    try:
        d = decode_untrusted(body, max_size=MAX_HEADER, max_depth=1)
    except BencodeError as exc:
        raise ReachError(f"circuit header is not valid bencode: {exc}") from None
    if not isinstance(d, dict):
        raise ReachError("circuit header must be a dictionary")
    op = d.get(b"op")
    if op == OP_CONNECT:
        target = d.get(b"t")
        if not isinstance(target, bytes) or len(target) != 32:
            raise ReachError("a connect header's target 't' must be a 32-byte key")
        return CircuitRequest(OP_CONNECT, target=target)
    if op == OP_ACCEPT:
        cid = d.get(b"c")
        if not isinstance(cid, bytes) or len(cid) != CIRCUIT_ID_SIZE:
            raise ReachError(f"an accept header's circuit 'c' must be {CIRCUIT_ID_SIZE} bytes")
        return CircuitRequest(OP_ACCEPT, circuit=cid)
    raise ReachError("circuit header op must be 'c' (connect) or 'a' (accept)")


def encode_status(status: int, message: str = "") -> bytes:
    raw = message.encode("utf-8")[:MAX_STATUS]
    return struct.pack(">BH", status, len(raw)) + raw


def parse_status_head_untrusted(head: bytes) -> tuple[int, int]:
    """``(status, message length)`` from the first 3 bytes of a relay's answer."""
    if len(head) != 3:
        raise ReachError("relay status must start with 3 bytes")
    status, n = struct.unpack(">BH", head)
    if n > MAX_STATUS:
        raise ReachError(f"relay status message of {n} bytes exceeds {MAX_STATUS}")
    return status, n


__all__ = ["Reach", "RelayAddr", "ReachError", "CircuitRequest", "encode_request", "parse_request_untrusted",
           "parse_request_length_untrusted", "encode_status", "parse_status_head_untrusted", "MAGIC",
           "MAX_RELAYS", "OP_CONNECT", "OP_ACCEPT", "STATUS_OK", "STATUS_REFUSED", "STATUS_NO_RESERVATION",
           "STATUS_OVER_QUOTA", "CIRCUIT_ID_SIZE", "addr_untrusted", "REACHABILITY"]
