"""Strict, canonical bencode (BEP 3) shared by the DHT and the transport.

Values map to Python as: integers <-> ``int``, byte strings <-> ``bytes``, lists <->
``list``, dictionaries <-> ``dict`` with ``bytes`` keys. ``encode`` also accepts
``str`` (UTF-8), ``bool`` (as 0/1), tuples and ``memoryview``/``bytearray``.

``decode_untrusted`` accepts only canonical input: dictionary keys are byte strings
in strictly ascending order, integers have no leading zeros and no ``-0``, string
lengths have no leading zeros. It enforces a nesting-depth cap and a total-size cap
before doing any work, and raises only :class:`BencodeError` for bad input.
"""

from __future__ import annotations

from typing import Union

from pymesh.errors import DecodeError

Value = Union[int, bytes, list["Value"], dict[bytes, "Value"]]

#: Default caps for untrusted input.
MAX_INPUT = 64 * 1024
MAX_DEPTH = 32


class BencodeError(DecodeError):
    """Bytes are not canonical bencode, or exceed a size or depth cap."""


def encode(value: object) -> bytes:
    """Encode ``value`` canonically (dictionary keys sorted as raw bytes)."""
    out: list[bytes] = []
    _encode(value, out, 0)
    return b"".join(out)


def _encode(value: object, out: list[bytes], depth: int) -> None:
    if depth > 64:
        raise ValueError("bencode: value nested too deeply to encode")
    if isinstance(value, bool):
        out.append(b"i1e" if value else b"i0e")
    elif isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        out.append(b"%d:" % len(raw))
        out.append(raw)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out.append(b"%d:" % len(raw))
        out.append(raw)
    elif isinstance(value, (list, tuple)):
        out.append(b"l")
        for item in value:
            _encode(item, out, depth + 1)
        out.append(b"e")
    elif isinstance(value, dict):
        items: list[tuple[bytes, object]] = []
        for key, item in value.items():
            if isinstance(key, str):
                key = key.encode("utf-8")
            if not isinstance(key, (bytes, bytearray)):
                raise TypeError(f"bencode: dictionary keys must be bytes or str, not {type(key).__name__}")
            items.append((bytes(key), item))
        items.sort(key=lambda kv: kv[0])
        for i in range(1, len(items)):
            if items[i][0] == items[i - 1][0]:
                raise ValueError(f"bencode: duplicate dictionary key {items[i][0]!r}")
        out.append(b"d")
        for key, item in items:
            out.append(b"%d:" % len(key))
            out.append(key)
            _encode(item, out, depth + 1)
        out.append(b"e")
    else:
        raise TypeError(f"bencode: cannot encode {type(value).__name__}")


def decode_untrusted(data: bytes | bytearray | memoryview, *, max_size: int = MAX_INPUT,
                     max_depth: int = MAX_DEPTH) -> Value:
    """Decode one complete canonical bencoded value from untrusted ``data``.

    Raises :class:`BencodeError` for anything that is not exactly one canonical value
    within the caps.
    """
    if len(data) > max_size:
        raise BencodeError(f"bencode: input of {len(data)} bytes exceeds the cap of {max_size}")
    buf = bytes(data)
    value, pos = _Decoder(buf, max_depth).decode(0, 0)
    if pos != len(buf):
        raise BencodeError(f"bencode: {len(buf) - pos} trailing bytes after the value")
    return value


def decode_prefix_untrusted(data: bytes | bytearray | memoryview, *, max_size: int = MAX_INPUT,
                            max_depth: int = MAX_DEPTH) -> tuple[Value, int]:
    """Decode the first value of ``data``; return it and the offset just past it."""
    if len(data) > max_size:
        data = data[:max_size]
    buf = bytes(data)
    return _Decoder(buf, max_depth).decode(0, 0)


def raw_value_span_untrusted(data: bytes, key: bytes, *, max_size: int = MAX_INPUT) -> bytes | None:
    """Return the raw encoded bytes of ``key``'s value in a top-level or nested ``a``/``r``
    dictionary exactly as they appear on the wire (BEP 44 signs ``v`` as sent).

    Looks in the top-level dictionary and one level down. Returns None if absent.
    """
    if len(data) > max_size:
        raise BencodeError(f"bencode: input of {len(data)} bytes exceeds the cap of {max_size}")
    dec = _Decoder(bytes(data), MAX_DEPTH)
    return dec.find_raw(key)


class _Decoder:
    __slots__ = ("buf", "max_depth")

    def __init__(self, buf: bytes, max_depth: int) -> None:
        self.buf = buf
        self.max_depth = max_depth

    def _fail(self, why: str, pos: int) -> BencodeError:
        return BencodeError(f"bencode: {why} at offset {pos}")

    def decode(self, pos: int, depth: int) -> tuple[Value, int]:
        buf = self.buf
        if pos >= len(buf):
            raise self._fail("unexpected end of input", pos)
        c = buf[pos]
        if c == 0x69:  # 'i'
            return self._int(pos)
        if 0x30 <= c <= 0x39:
            return self._bytes(pos)
        if c == 0x6C or c == 0x64:  # 'l' / 'd'
            if depth >= self.max_depth:
                raise self._fail(f"nesting deeper than {self.max_depth}", pos)
            if c == 0x6C:
                items: list[Value] = []
                pos += 1
                while True:
                    if pos >= len(buf):
                        raise self._fail("unterminated list", pos)
                    if buf[pos] == 0x65:
                        return items, pos + 1
                    item, pos = self.decode(pos, depth + 1)
                    items.append(item)
            result: dict[bytes, Value] = {}
            last: bytes | None = None
            pos += 1
            while True:
                if pos >= len(buf):
                    raise self._fail("unterminated dictionary", pos)
                if buf[pos] == 0x65:
                    return result, pos + 1
                if not 0x30 <= buf[pos] <= 0x39:
                    raise self._fail("dictionary key is not a byte string", pos)
                key, pos = self._bytes(pos)
                if last is not None and key <= last:
                    raise self._fail(f"dictionary keys not strictly sorted ({key!r} after {last!r})", pos)
                last = key
                value, pos = self.decode(pos, depth + 1)
                result[key] = value
        raise self._fail(f"unexpected byte {c:#04x}", pos)

    def _int(self, pos: int) -> tuple[int, int]:
        buf = self.buf
        end = buf.find(b"e", pos + 1, pos + 1 + 64)
        if end < 0:
            raise self._fail("unterminated or over-long integer", pos)
        digits = buf[pos + 1:end]
        neg = digits.startswith(b"-")
        body = digits[1:] if neg else digits
        if not body or not body.isdigit():
            raise self._fail("malformed integer", pos)
        if (body[0] == 0x30 and len(body) > 1) or (neg and body == b"0"):
            raise self._fail("non-canonical integer", pos)
        value = int(body)
        return (-value if neg else value), end + 1

    def _bytes(self, pos: int) -> tuple[bytes, int]:
        buf = self.buf
        colon = buf.find(b":", pos, pos + 12)
        if colon < 0:
            raise self._fail("malformed string length", pos)
        digits = buf[pos:colon]
        if not digits.isdigit() or (digits[0] == 0x30 and len(digits) > 1):
            raise self._fail("non-canonical string length", pos)
        length = int(digits)
        start = colon + 1
        end = start + length
        if end > len(buf):
            raise self._fail(f"string of {length} bytes runs past the end", pos)
        return buf[start:end], end

    def find_raw(self, key: bytes) -> bytes | None:
        buf = self.buf
        if not buf or buf[0] != 0x64:
            raise self._fail("expected a dictionary", 0)
        pos = 1
        nested: list[int] = []
        while pos < len(buf) and buf[pos] != 0x65:
            k, pos = self._bytes(pos)
            start = pos
            _, pos = self.decode(pos, 1)
            if k == key:
                return buf[start:pos]
            if buf[start] == 0x64:
                nested.append(start)
        for start in nested:
            sub = _Decoder(buf[start:], self.max_depth)
            try:
                found = sub.find_raw(key)
            except BencodeError:
                continue
            if found is not None:
                return found
        return None
