"""Frame codec of the pymesh transport: a fixed binary header, bencoded metadata,
raw little-endian tensor bytes.

Wire layout of one frame (all integers little-endian)::

    offset size  field
    0      4     magic b"PMSH"
    4      1     frame format version (FRAME_VERSION)
    5      1     frame type (FrameType)
    6      2     flags (reserved, 0)
    8      8     request id
    16     4     metadata length M
    20     8     payload length P
    28     M     bencoded envelope: {n: name, u: user meta, t: [[dtype, [dims...]], ...],
                                     c: error code, x: error message}  (each key optional)
    28+M   P     tensor bytes, one tensor after the other, in the order of ``t``

Every length is checked against :class:`FrameLimits` before anything is allocated,
and every parser of peer bytes ends in ``_untrusted`` and raises only
:class:`FrameError`. This module is synchronous and imports neither trio nor torch.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from pymesh.errors import RemoteProtocolError
from pymesh.proto import bencode

MAGIC = b"PMSH"
FRAME_VERSION = 1
HEADER = struct.Struct("<4sBBHQIQ")
HEADER_SIZE = HEADER.size  # 28

#: dtype name -> element size in bytes. Tensor bytes are always little-endian.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}

Meta = dict[str, object]


class FrameError(RemoteProtocolError):
    """A peer sent a frame that is malformed, truncated or exceeds a size cap."""


class FrameType(enum.IntEnum):
    CALL = 1
    REPLY = 2
    ERROR = 3
    PUSH = 4
    CANCEL = 5
    HELLO = 6
    AUTH = 7
    WELCOME = 8
    PING = 9
    PONG = 10


@dataclass(frozen=True)
class FrameLimits:
    """Caps applied to every frame received from a peer. ``phase`` names the frames they
    apply to in error messages ("handshake" for the frames read before the peer proved
    its key, see :data:`HANDSHAKE_LIMITS`)."""

    max_meta_bytes: int = 64 * 1024
    max_frame_bytes: int = 512 * 1024 * 1024
    max_tensors: int = 64
    max_dims: int = 8
    phase: str = ""


#: Caps on the frames read before the peer proved its key (HELLO, AUTH, WELCOME, a
#: handshake ERROR): a few hundred bytes of metadata, never tensors. An unauthenticated
#: peer can make this node hold at most this much per connection.
HANDSHAKE_LIMITS = FrameLimits(max_meta_bytes=4096, max_frame_bytes=0, max_tensors=0, max_dims=0,
                               phase="handshake")

#: Received payload is committed (allocated and charged to a :class:`ReceiveBudget`) in
#: pieces of at most this many bytes, each just before its bytes are read: a peer that
#: announces a large frame and stalls makes this node hold what it sent plus one piece.
RECV_COMMIT_CHUNK = 1 << 20


@dataclass
class TensorBlob:
    """A tensor as bytes: dtype name, shape and C-contiguous little-endian data."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"unsupported tensor dtype {self.dtype!r}; use one of {sorted(DTYPE_SIZES)}")
        if not isinstance(self.data, memoryview):
            self.data = memoryview(self.data)
        if self.data.format != "B" or self.data.ndim != 1:
            self.data = self.data.cast("B")
        expected = nbytes_of(self.dtype, self.shape)
        if len(self.data) != expected:
            raise ValueError(
                f"tensor blob of dtype {self.dtype} and shape {self.shape} needs {expected} bytes, "
                f"got {len(self.data)}"
            )

    @property
    def nbytes(self) -> int:
        return len(self.data)


def nbytes_of(dtype: str, shape: Sequence[int]) -> int:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n


@dataclass
class FrameHeader:
    type: FrameType
    flags: int
    request_id: int
    meta_len: int
    payload_len: int


@dataclass
class Envelope:
    """Decoded metadata of a frame."""

    name: str = ""
    meta: Meta = field(default_factory=dict)
    specs: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    code: str = ""
    message: str = ""


@dataclass
class Frame:
    type: FrameType
    request_id: int
    envelope: Envelope
    tensors: list[TensorBlob]


# --------------------------------------------------------------------------- encode


def encode_frame_head(ftype: FrameType, request_id: int, *, name: str = "", meta: Meta | None = None,
                      tensors: Sequence[TensorBlob] = (), code: str = "", message: str = "",
                      limits: FrameLimits | None = None) -> tuple[bytes, list[memoryview]]:
    """Header + metadata as one bytes object, and the tensor payloads as views (no copy)."""
    meta_bytes = encode_envelope(name, meta, tensors, code, message)
    payload_len = sum(t.nbytes for t in tensors)
    if limits is not None:
        if len(meta_bytes) > limits.max_meta_bytes:
            raise ValueError(f"frame metadata of {len(meta_bytes)} bytes exceeds max_meta_bytes={limits.max_meta_bytes}")
        if payload_len > limits.max_frame_bytes:
            raise ValueError(f"frame payload of {payload_len} bytes exceeds max_frame_bytes={limits.max_frame_bytes}")
        if len(tensors) > limits.max_tensors:
            raise ValueError(f"{len(tensors)} tensors in one frame exceed max_tensors={limits.max_tensors}")
    head = HEADER.pack(MAGIC, FRAME_VERSION, int(ftype), 0, request_id, len(meta_bytes), payload_len)
    return head + meta_bytes, [t.data for t in tensors if t.nbytes]


def _bstr(text: str) -> bytes:
    raw = text.encode("utf-8")
    return b"%d:%s" % (len(raw), raw)


def encode_envelope(name: str, meta: Meta | None, tensors: Sequence[TensorBlob], code: str = "",
                    message: str = "") -> bytes:
    """The bencoded envelope, written directly (keys c < n < t < u < x are already in
    canonical order); equal to ``bencode.encode`` of the same dictionary, only faster on
    the per-call path. Empty envelope -> no bytes."""
    if not (name or meta or tensors or code or message):
        return b""
    parts = [b"d"]
    if code:
        parts += [b"1:c", _bstr(code)]
    if name:
        parts += [b"1:n", _bstr(name)]
    if tensors:
        parts.append(b"1:tl")
        for t in tensors:
            parts += [b"l", _bstr(t.dtype), b"l", *(b"i%de" % d for d in t.shape), b"ee"]
        parts.append(b"e")
    if meta:
        parts += [b"1:u", bencode.encode(meta)]
    if message:
        parts += [b"1:x", _bstr(message)]
    parts.append(b"e")
    return b"".join(parts)


def encode_frame(ftype: FrameType, request_id: int, **kwargs: object) -> bytes:
    """The whole frame as one bytes object (tests, small control frames)."""
    head, payloads = encode_frame_head(ftype, request_id, **kwargs)  # type: ignore[arg-type]
    return head + b"".join(bytes(p) for p in payloads)


# --------------------------------------------------------------------------- decode


def decode_header_untrusted(data: bytes | bytearray | memoryview, limits: FrameLimits) -> FrameHeader:
    if len(data) != HEADER_SIZE:
        raise FrameError(f"frame header is {HEADER_SIZE} bytes, got {len(data)}")
    magic, version, ftype, flags, request_id, meta_len, payload_len = HEADER.unpack(data)
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r}): the peer does not speak pymesh")
    if version != FRAME_VERSION:
        raise FrameError(f"frame format version {version} is not supported (this node speaks {FRAME_VERSION})")
    try:
        kind = FrameType(ftype)
    except ValueError:
        raise FrameError(f"unknown frame type {ftype}") from None
    if limits.phase == "handshake" and (meta_len > limits.max_meta_bytes or payload_len > limits.max_frame_bytes):
        raise FrameError(
            f"{kind.name} frame of {meta_len} metadata and {payload_len} payload bytes exceeds the cap of "
            f"{limits.max_meta_bytes} metadata bytes and no tensors on frames sent before the peer proved "
            "its key (handshake); the peer is not a pymesh node or is hostile"
        )
    if meta_len > limits.max_meta_bytes:
        raise FrameError(f"frame metadata of {meta_len} bytes exceeds the cap of {limits.max_meta_bytes}")
    if payload_len > limits.max_frame_bytes:
        raise FrameError(
            f"frame payload of {payload_len} bytes exceeds the cap of {limits.max_frame_bytes} "
            "(raise TransportConfig.max_frame_bytes on the receiver if this is legitimate)"
        )
    return FrameHeader(kind, flags, request_id, meta_len, payload_len)


def _text(value: object, what: str) -> str:
    if not isinstance(value, bytes):
        raise FrameError(f"frame field {what} must be a byte string")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(f"frame field {what} is not UTF-8") from None


def _str_keys(value: object, depth: int = 0) -> object:
    """Turn dictionary keys into str, recursively; byte string values stay bytes."""
    if isinstance(value, dict):
        return {_text(k, "meta key"): _str_keys(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_str_keys(v, depth + 1) for v in value]
    return value


def decode_envelope_untrusted(data: bytes | bytearray | memoryview, payload_len: int,
                              limits: FrameLimits) -> Envelope:
    """Decode the metadata of a frame and check its tensor specs against ``payload_len``."""
    env = Envelope()
    if len(data) == 0:
        if payload_len:
            raise FrameError(f"frame announces {payload_len} payload bytes but no tensors")
        return env
    try:
        raw = bencode.decode_untrusted(data, max_size=limits.max_meta_bytes)
    except bencode.BencodeError as exc:
        raise FrameError(f"frame metadata is not valid bencode: {exc}") from None
    if not isinstance(raw, dict):
        raise FrameError("frame metadata must be a dictionary")
    if b"n" in raw:
        env.name = _text(raw[b"n"], "n (name)")
    if b"u" in raw:
        user = raw[b"u"]
        if not isinstance(user, dict):
            raise FrameError("frame field u (meta) must be a dictionary")
        env.meta = _str_keys(user)  # type: ignore[assignment]
    if b"c" in raw:
        env.code = _text(raw[b"c"], "c (error code)")
    if b"x" in raw:
        env.message = _text(raw[b"x"], "x (error message)")
    total = 0
    specs = raw.get(b"t", [])
    if not isinstance(specs, list):
        raise FrameError("frame field t (tensors) must be a list")
    if len(specs) > limits.max_tensors:
        raise FrameError(f"frame carries {len(specs)} tensors; the cap is {limits.max_tensors}")
    for i, spec in enumerate(specs):
        if not isinstance(spec, list) or len(spec) != 2 or not isinstance(spec[1], list):
            raise FrameError(f"tensor spec {i} must be [dtype, [dims...]]")
        dtype = _text(spec[0], f"t[{i}] dtype")
        if dtype not in DTYPE_SIZES:
            raise FrameError(f"tensor {i} has unsupported dtype {dtype!r}")
        dims = spec[1]
        if len(dims) > limits.max_dims:
            raise FrameError(f"tensor {i} has {len(dims)} dimensions; the cap is {limits.max_dims}")
        shape: list[int] = []
        for d in dims:
            if not isinstance(d, int) or d < 0 or d > limits.max_frame_bytes:
                raise FrameError(f"tensor {i} has an invalid dimension {d!r}")
            shape.append(d)
        total += nbytes_of(dtype, shape)
        if total > payload_len:
            raise FrameError(f"tensor specs need more than the {payload_len} payload bytes the header announces")
        env.specs.append((dtype, tuple(shape)))
    if total != payload_len:
        raise FrameError(f"tensor specs describe {total} bytes but the header announces {payload_len}")
    return env


def decode_frame_untrusted(data: bytes | bytearray | memoryview, limits: FrameLimits) -> Frame:
    """Decode one complete frame held in memory (control frames, tests, fuzzing)."""
    view = memoryview(data)
    if len(view) < HEADER_SIZE:
        raise FrameError(f"truncated frame: {len(view)} bytes, the header alone is {HEADER_SIZE}")
    head = decode_header_untrusted(view[:HEADER_SIZE], limits)
    end_meta = HEADER_SIZE + head.meta_len
    if len(view) != end_meta + head.payload_len:
        raise FrameError(
            f"frame length mismatch: header announces {end_meta + head.payload_len} bytes, got {len(view)}"
        )
    env = decode_envelope_untrusted(view[HEADER_SIZE:end_meta], head.payload_len, limits)
    tensors: list[TensorBlob] = []
    pos = end_meta
    for dtype, shape in env.specs:
        n = nbytes_of(dtype, shape)
        tensors.append(TensorBlob(dtype, shape, memoryview(bytearray(view[pos:pos + n]))))
        pos += n
    return Frame(head.type, head.request_id, env, tensors)


class FrameReader(Protocol):
    """A byte source that frames are read from (a TCP connection, a QUIC stream)."""

    async def read_exact(self, n: int) -> bytes | bytearray: ...

    async def readinto_exact(self, view: memoryview) -> None: ...


class ReceiveBudget(Protocol):
    """Accounting of received payload bytes (the transports' in-flight caps). Either method
    may wait until memory is released, or raise :class:`FrameError` when the frame can
    never fit; ``read_frame_untrusted`` calls them before reading the bytes they count."""

    async def admit(self, payload_len: int) -> None:
        """Once per frame with a payload, after its header and metadata passed the caps."""

    async def grow(self, nbytes: int) -> None:
        """Before ``nbytes`` more payload bytes are committed (allocated) and read."""


#: Allocates the receive buffer of one tensor: ``alloc(nbytes) -> writable memoryview``.
#: It may commit the memory at once (pinned host memory does): the reader then charges
#: the whole tensor to the budget before calling it. Without one, buffers grow as bytes
#: arrive.
Allocator = Callable[[int], memoryview]

def _resize_function() -> Callable[[bytearray, int], int] | None:
    """CPython's ``PyByteArray_Resize``: grows a bytearray without writing the new bytes
    (no zero-fill pass: the socket's bytes are the first to touch that memory)."""
    try:
        import ctypes

        proto = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_ssize_t)
        return proto(("PyByteArray_Resize", ctypes.pythonapi))
    except (ImportError, AttributeError, OSError):  # pragma: no cover - not CPython
        return None


_resize = _resize_function()
_ZEROS = memoryview(bytes(RECV_COMMIT_CHUNK))


def _extend(buf: bytearray, k: int) -> None:
    """Append ``k`` bytes that the caller overwrites before anyone reads them."""
    if _resize is not None:
        _resize(buf, len(buf) + k)
    else:  # pragma: no cover - not CPython
        buf += _ZEROS[:k]


async def _read_growing(reader: FrameReader, n: int, budget: ReceiveBudget | None) -> memoryview:
    """``n`` payload bytes in a buffer that grows one :data:`RECV_COMMIT_CHUNK` at a time,
    each piece committed only when its bytes are about to be read, and received in place.
    The buffer is returned only once every byte of it was read."""
    buf = bytearray()
    pos = 0
    while pos < n:
        k = min(RECV_COMMIT_CHUNK, n - pos)
        if budget is not None:
            await budget.grow(k)
        _extend(buf, k)
        with memoryview(buf) as whole:
            await reader.readinto_exact(whole[pos:pos + k])
        pos += k
    return memoryview(buf)


async def read_frame_untrusted(reader: FrameReader, limits: FrameLimits, *,
                               first: bytes | bytearray | None = None,
                               alloc: Allocator | None = None,
                               budget: ReceiveBudget | None = None) -> Frame:
    """Read one frame. Memory follows the bytes, never the announced sizes: without
    ``alloc`` each tensor's buffer grows as its bytes arrive; with ``alloc`` (called only
    after the announced sizes passed the caps) the whole tensor is charged to ``budget``
    first. The returned blobs own their buffers."""
    raw = first if first is not None else await reader.read_exact(HEADER_SIZE)
    head = decode_header_untrusted(raw, limits)
    meta = await reader.read_exact(head.meta_len) if head.meta_len else b""
    env = decode_envelope_untrusted(meta, head.payload_len, limits)
    if budget is not None and head.payload_len:
        await budget.admit(head.payload_len)
    tensors: list[TensorBlob] = []
    for dtype, shape in env.specs:
        n = nbytes_of(dtype, shape)
        if not n:
            view = memoryview(b"")
        elif alloc is None and n > RECV_COMMIT_CHUNK:
            view = await _read_growing(reader, n, budget)
        else:  # one piece at most (or an allocator): committed at once
            if budget is not None:
                await budget.grow(n)
            view = alloc(n) if alloc is not None else memoryview(bytearray(n))
            if len(view) != n or view.readonly:
                raise ValueError(f"receive allocator returned {len(view)} bytes (readonly={view.readonly}), "
                                 f"asked for {n}")
            await reader.readinto_exact(view)
        tensors.append(TensorBlob(dtype, shape, view))
    return Frame(head.type, head.request_id, env, tensors)
