"""KRPC messages of BitTorrent's Mainline DHT (BEP 5) and its storage extension (BEP 44).

A KRPC message is one bencoded dictionary per UDP datagram::

    query     {"t": tid, "y": "q", "q": method, "a": {"id": node_id, ...}}
    response  {"t": tid, "y": "r", "r": {"id": node_id, ...}}
    error     {"t": tid, "y": "e", "e": [code, message]}

:func:`decode_message_untrusted` turns a datagram into a :class:`Query`,
:class:`Response` or :class:`ErrorReply` and raises only :class:`KRPCError`.
The per-method argument checks (`parse_*_untrusted`) raise :class:`KRPCError` with
the BEP error code to send back (203 for malformed arguments).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Union

from pymesh.errors import DecodeError
from pymesh.proto.bencode import BencodeError, Value, decode_untrusted, encode

#: Largest datagram a node accepts; BEP 5 packets are far smaller.
MAX_DATAGRAM = 1500
#: What a node aims to stay under when it builds a response (safe over most paths).
SAFE_PAYLOAD = 1400
ID_LEN = 20
COMPACT_NODE_LEN = 26
MAX_TOKEN = 64
MAX_TID = 16

# Error codes (BEP 5, BEP 44).
GENERIC_ERROR = 201
SERVER_ERROR = 202
PROTOCOL_ERROR = 203
METHOD_UNKNOWN = 204
MESSAGE_TOO_BIG = 205
INVALID_SIGNATURE = 206
SALT_TOO_BIG = 207
CAS_MISMATCH = 301
SEQ_TOO_OLD = 302


class KRPCError(DecodeError):
    """A datagram or its arguments violate KRPC; ``code`` is the error to send back."""

    def __init__(self, message: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


Addr = tuple[str, int]


@dataclass(frozen=True)
class Contact:
    """A node as other nodes describe it: 160-bit ID and UDP address."""

    node_id: bytes
    addr: Addr


@dataclass
class Query:
    tid: bytes
    method: bytes
    args: dict[bytes, Value]
    sender_id: bytes
    read_only: bool = False
    #: Bytes of the datagram it came in (a reply to an unverified source is bounded by it).
    size: int = 0


@dataclass
class Response:
    tid: bytes
    values: dict[bytes, Value]
    sender_id: bytes
    #: Our address as the responder saw it (BEP 42 "ip" key), if sent.
    seen_ip: Addr | None = None


@dataclass
class ErrorReply:
    tid: bytes
    code: int
    message: str


Message = Union[Query, Response, ErrorReply]


# -- compact encodings ---------------------------------------------------------------------

def pack_addr(addr: Addr) -> bytes:
    """6-byte compact IPv4 address + port; ValueError if not an IPv4 address."""
    try:
        return socket.inet_pton(socket.AF_INET, addr[0]) + struct.pack("!H", addr[1])
    except (OSError, struct.error) as exc:
        raise ValueError(f"{addr!r} is not an IPv4 address and port: {exc}") from None


def unpack_addr_untrusted(raw: bytes) -> Addr:
    if len(raw) != 6:
        raise KRPCError(f"compact address must be 6 bytes, got {len(raw)}")
    return socket.inet_ntop(socket.AF_INET, raw[:4]), (raw[4] << 8) | raw[5]


def pack_nodes(contacts: list[Contact]) -> bytes:
    out = []
    for c in contacts:
        try:
            out.append(c.node_id + pack_addr(c.addr))
        except ValueError:
            continue  # IPv6 or unparsable host: not representable in "nodes"
    return b"".join(out)


def unpack_nodes_untrusted(raw: bytes, *, limit: int = 64) -> list[Contact]:
    """Parse compact node info; skips entries with port 0. Raises KRPCError."""
    if len(raw) % COMPACT_NODE_LEN:
        raise KRPCError(f"compact node info length {len(raw)} is not a multiple of 26")
    if len(raw) // COMPACT_NODE_LEN > limit:
        raise KRPCError(f"more than {limit} nodes in one reply")
    out: list[Contact] = []
    for i in range(0, len(raw), COMPACT_NODE_LEN):
        chunk = raw[i:i + COMPACT_NODE_LEN]
        addr = unpack_addr_untrusted(chunk[20:])
        if addr[1] == 0:
            continue
        out.append(Contact(chunk[:20], addr))
    return out


# -- encoding --------------------------------------------------------------------------------

def encode_query(tid: bytes, method: bytes, args: dict[bytes, object], *,
                 read_only: bool = False, client: bytes | None = None) -> bytes:
    msg: dict[bytes, object] = {b"t": tid, b"y": b"q", b"q": method, b"a": args}
    if read_only:
        msg[b"ro"] = 1
    if client:
        msg[b"v"] = client
    return encode(msg)


def encode_response(tid: bytes, values: dict[bytes, object], *, seen: Addr | None = None,
                    client: bytes | None = None) -> bytes:
    msg: dict[bytes, object] = {b"t": tid, b"y": b"r", b"r": values}
    if seen is not None:
        try:
            msg[b"ip"] = pack_addr(seen)
        except ValueError:
            pass
    if client:
        msg[b"v"] = client
    return encode(msg)


def encode_error(tid: bytes, code: int, message: str) -> bytes:
    return encode({b"t": tid, b"y": b"e", b"e": [code, message.encode("utf-8", "replace")[:200]]})


# -- decoding --------------------------------------------------------------------------------

def _node_id(d: dict[bytes, Value], where: str) -> bytes:
    nid = d.get(b"id")
    if not isinstance(nid, bytes) or len(nid) != ID_LEN:
        raise KRPCError(f"{where}: 'id' must be a 20-byte string")
    return nid


def decode_message_untrusted(data: bytes) -> Message:
    """Parse one datagram. Raises only :class:`KRPCError`."""
    if len(data) > MAX_DATAGRAM:
        raise KRPCError(f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    try:
        msg = decode_untrusted(data, max_size=MAX_DATAGRAM, max_depth=8)
    except BencodeError as exc:
        raise KRPCError(f"not a KRPC message: {exc}") from None
    if not isinstance(msg, dict):
        raise KRPCError("a KRPC message must be a dictionary")
    tid = msg.get(b"t")
    if not isinstance(tid, bytes) or len(tid) > MAX_TID:
        raise KRPCError("missing or over-long transaction id 't'")
    kind = msg.get(b"y")
    if kind == b"q":
        method = msg.get(b"q")
        args = msg.get(b"a")
        if not isinstance(method, bytes) or not isinstance(args, dict):
            raise KRPCError("query needs a method name 'q' and an argument dictionary 'a'")
        return Query(tid, method, args, _node_id(args, "query"), read_only=msg.get(b"ro") == 1, size=len(data))
    if kind == b"r":
        values = msg.get(b"r")
        if not isinstance(values, dict):
            raise KRPCError("response needs a dictionary 'r'")
        seen: Addr | None = None
        ip = msg.get(b"ip")
        if isinstance(ip, bytes) and len(ip) == 6:
            seen = unpack_addr_untrusted(ip)
        return Response(tid, values, _node_id(values, "response"), seen)
    if kind == b"e":
        err = msg.get(b"e")
        if not isinstance(err, list) or len(err) < 2 or not isinstance(err[0], int) \
                or not isinstance(err[1], bytes):
            raise KRPCError("error reply needs 'e': [code, message]")
        return ErrorReply(tid, err[0], err[1].decode("utf-8", "replace"))
    raise KRPCError(f"unknown message type 'y'={kind!r}")


# -- typed arguments ------------------------------------------------------------------------

def get_id20(args: dict[bytes, Value], key: bytes) -> bytes:
    v = args.get(key)
    if not isinstance(v, bytes) or len(v) != ID_LEN:
        raise KRPCError(f"argument {key.decode()!r} must be a 20-byte string")
    return v


def get_int(args: dict[bytes, Value], key: bytes, lo: int, hi: int, default: int | None = None) -> int:
    v = args.get(key)
    if v is None and default is not None:
        return default
    if not isinstance(v, int) or not lo <= v <= hi:
        raise KRPCError(f"argument {key.decode()!r} must be an integer in {lo}..{hi}")
    return v


def get_bytes(args: dict[bytes, Value], key: bytes, max_len: int, *, required: bool = True) -> bytes | None:
    v = args.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, bytes):
        raise KRPCError(f"argument {key.decode()!r} must be a byte string")
    if len(v) > max_len:
        raise KRPCError(f"argument {key.decode()!r} longer than {max_len} bytes")
    return v


def reply_nodes_untrusted(values: dict[bytes, Value]) -> list[Contact]:
    """The ``nodes`` of a find_node / get_peers / get reply (empty if absent)."""
    raw = values.get(b"nodes")
    if raw is None:
        return []
    if not isinstance(raw, bytes):
        raise KRPCError("'nodes' must be a byte string")
    return unpack_nodes_untrusted(raw)


def reply_peers_untrusted(values: dict[bytes, Value], *, limit: int = 200) -> list[Addr]:
    raw = values.get(b"values")
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > limit:
        raise KRPCError("'values' must be a list of compact peer addresses")
    out: list[Addr] = []
    for item in raw:
        if isinstance(item, bytes) and len(item) == 6:
            out.append(unpack_addr_untrusted(item))
    return out


@dataclass
class PutArgs:
    """Parsed arguments of a BEP 44 ``put``."""

    v: Value
    v_raw: bytes
    token: bytes
    key: bytes | None = None
    sig: bytes | None = None
    seq: int | None = None
    salt: bytes = b""
    cas: int | None = None
    extra: dict[str, object] = field(default_factory=dict)


def parse_put_untrusted(args: dict[bytes, Value], *, max_value: int = 1000) -> PutArgs:
    if b"v" not in args:
        raise KRPCError("put needs a value 'v'")
    v = args[b"v"]
    v_raw = encode(v)  # canonical decode => re-encoding gives the bytes as sent
    if len(v_raw) > max_value:
        raise KRPCError(f"value of {len(v_raw)} bytes exceeds {max_value}", MESSAGE_TOO_BIG)
    token = get_bytes(args, b"token", MAX_TOKEN)
    assert token is not None
    if b"k" not in args:
        return PutArgs(v, v_raw, token)
    key = get_bytes(args, b"k", 32)
    sig = get_bytes(args, b"sig", 64)
    if key is None or len(key) != 32 or sig is None or len(sig) != 64:
        raise KRPCError("mutable put needs a 32-byte 'k' and a 64-byte 'sig'")
    seq = get_int(args, b"seq", 0, 2**63 - 1)
    salt_v = args.get(b"salt", b"")
    if not isinstance(salt_v, bytes):
        raise KRPCError("'salt' must be a byte string")
    if len(salt_v) > 64:
        raise KRPCError(f"salt of {len(salt_v)} bytes exceeds 64", SALT_TOO_BIG)
    cas = None
    if b"cas" in args:
        cas = get_int(args, b"cas", 0, 2**63 - 1)
    return PutArgs(v, v_raw, token, key, sig, seq, salt_v, cas)


def mutable_sign_input(v_raw: bytes, seq: int, salt: bytes = b"") -> bytes:
    """The bytes a BEP 44 mutable item's signature covers."""
    prefix = b"4:salt%d:%s" % (len(salt), salt) if salt else b""
    return prefix + b"3:seqi%de1:v" % seq + v_raw
