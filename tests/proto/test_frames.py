"""Frame codec: round trips, caps checked before allocation, fuzzed decoders."""

from __future__ import annotations

import struct

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import trio

from pymesh.errors import RemoteProtocolError
from pymesh.proto.frames import (
    HANDSHAKE_LIMITS, HEADER, MAGIC, RECV_COMMIT_CHUNK, Frame, FrameError, FrameLimits, FrameType, TensorBlob,
    decode_frame_untrusted, decode_header_untrusted, encode_frame, read_frame_untrusted,
)

LIMITS = FrameLimits(max_meta_bytes=4096, max_frame_bytes=1 << 20, max_tensors=4, max_dims=4)


def test_round_trip_with_tensors_and_meta() -> None:
    a = TensorBlob("float32", (2, 3), memoryview(bytes(range(24))))
    b = TensorBlob("bfloat16", (0,), memoryview(b""))
    data = encode_frame(FrameType.CALL, 7, name="forward", meta={"session": b"\x00\xff", "step": 3,
                                                                  "nested": {"k": [1, b"x"]}}, tensors=[a, b])
    frame = decode_frame_untrusted(data, LIMITS)
    assert frame.type == FrameType.CALL and frame.request_id == 7
    assert frame.envelope.name == "forward"
    assert frame.envelope.meta == {"session": b"\x00\xff", "step": 3, "nested": {"k": [1, b"x"]}}
    assert [(t.dtype, t.shape) for t in frame.tensors] == [("float32", (2, 3)), ("bfloat16", (0,))]
    assert bytes(frame.tensors[0].data) == bytes(range(24))


def test_error_frame_carries_code_and_message() -> None:
    frame = decode_frame_untrusted(encode_frame(FrameType.ERROR, 1, code="busy", message="try later"), LIMITS)
    assert (frame.envelope.code, frame.envelope.message) == ("busy", "try later")


def test_blob_checks_its_size() -> None:
    with pytest.raises(ValueError, match="needs 8 bytes"):
        TensorBlob("float32", (2,), memoryview(b"1234"))
    with pytest.raises(ValueError, match="unsupported"):
        TensorBlob("complex64", (1,), memoryview(b"12345678"))


def test_four_gigabyte_announcement_is_rejected_from_the_header_alone() -> None:
    head = HEADER.pack(MAGIC, 1, FrameType.CALL, 0, 1, 10, 4 << 30)
    with pytest.raises(FrameError, match="exceeds the cap"):
        decode_header_untrusted(head, LIMITS)


def test_oversized_metadata_is_rejected() -> None:
    head = HEADER.pack(MAGIC, 1, FrameType.CALL, 0, 1, 1 << 30, 0)
    with pytest.raises(FrameError, match="metadata"):
        decode_header_untrusted(head, LIMITS)


def test_tensor_specs_must_match_payload_and_caps() -> None:
    blob = TensorBlob("uint8", (4,), memoryview(b"abcd"))
    good = encode_frame(FrameType.REPLY, 1, tensors=[blob])
    # Header says 5 payload bytes, spec says 4.
    bad = bytearray(good)
    struct.pack_into("<Q", bad, 20, 5)
    with pytest.raises(FrameError):
        decode_frame_untrusted(bytes(bad) + b"e", LIMITS)
    many = [TensorBlob("uint8", (1,), memoryview(b"a"))] * 5
    with pytest.raises(FrameError, match="cap"):
        decode_frame_untrusted(encode_frame(FrameType.REPLY, 1, tensors=many), LIMITS)
    deep = TensorBlob("uint8", (1, 1, 1, 1, 1), memoryview(b"a"))
    with pytest.raises(FrameError, match="dimensions"):
        decode_frame_untrusted(encode_frame(FrameType.REPLY, 1, tensors=[deep]), LIMITS)


def test_truncated_frame_and_bad_magic() -> None:
    data = encode_frame(FrameType.PUSH, 0, name="t", tensors=[TensorBlob("uint8", (8,), memoryview(b"x" * 8))])
    for cut in (0, 5, len(data) - 1):
        with pytest.raises(FrameError):
            decode_frame_untrusted(data[:cut], LIMITS)
    with pytest.raises(FrameError, match="magic"):
        decode_frame_untrusted(b"HTTP" + data[4:], LIMITS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_raise_only_frame_error(data: bytes) -> None:
    try:
        decode_frame_untrusted(data, LIMITS)
    except FrameError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_frames(data: st.DataObject) -> None:
    blob = TensorBlob("int32", (2, 2), memoryview(bytes(16)))
    frame = bytearray(encode_frame(FrameType.CALL, 3, name="m", meta={"a": [1, 2], "b": b"x"}, tensors=[blob]))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    try:
        decoded = decode_frame_untrusted(bytes(frame[:cut]), LIMITS)
    except RemoteProtocolError as exc:
        assert isinstance(exc, FrameError)
    else:
        assert sum(t.nbytes for t in decoded.tensors) <= LIMITS.max_frame_bytes


def test_transport_timeout_from_settings() -> None:
    from pymesh.errors import ConfigError
    from pymesh.net.config import TransportConfig
    from pymesh.settings import SettingsError, load_settings

    assert TransportConfig().idle_timeout == 30.0
    settings = load_settings({"PYMESH_TRANSPORT_TIMEOUT": "2.5"})
    assert settings.transport_config().idle_timeout == 2.5
    assert settings.transport_config(idle_timeout=7).idle_timeout == 7
    with pytest.raises(SettingsError, match="PYMESH_TRANSPORT_TIMEOUT"):
        load_settings({"PYMESH_TRANSPORT_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="packet_size"):
        TransportConfig(packet_size=20000)


def test_config_defaults_ignore_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pymesh.net.config import TransportConfig
    from pymesh.net.dht import DHTConfig
    from pymesh.proto.identity import default_identity_path
    from pymesh.settings import load_settings

    for name in ("PYMESH_TRANSPORT_TIMEOUT", "PYMESH_RECORD_TTL", "PYMESH_HEARTBEAT", "PYMESH_DHT_TIMEOUT"):
        monkeypatch.setenv(name, "1.5")
    monkeypatch.setenv("PYMESH_HOME", str(tmp_path))
    assert TransportConfig().idle_timeout == 30.0
    cfg = DHTConfig()
    assert (cfg.record_ttl, cfg.heartbeat, cfg.rpc_timeout) == (300.0, 60.0, 2.0)
    assert default_identity_path("worker-1") == Path.home() / ".pymesh" / "worker-1.key"
    assert default_identity_path("worker-1", tmp_path) == tmp_path / "worker-1.key"
    settings = load_settings({"PYMESH_RECORD_TTL": "3", "PYMESH_HEARTBEAT": "1", "PYMESH_DHT_TIMEOUT": "0.5"})
    cfg = settings.dht_config(k=4)
    assert (cfg.record_ttl, cfg.heartbeat, cfg.rpc_timeout, cfg.k) == (3.0, 1.0, 0.5, 4)


_text = st.text(max_size=12)
_meta = st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.binary(max_size=8), st.lists(st.integers(),
                                                                                                      max_size=3)),
                        max_size=4)
_blobs = st.lists(st.tuples(st.sampled_from(["float32", "bfloat16", "int64", "uint8"]),
                            st.lists(st.integers(0, 3), max_size=3)), max_size=3)


@settings(max_examples=200, deadline=None)
@given(_text, _meta, _blobs, _text, _text)
def test_fast_envelope_encoder_matches_bencode(name: str, meta: dict[str, object],
                                               blobs: list[tuple[str, list[int]]], code: str, message: str) -> None:
    from pymesh.proto.frames import encode_envelope, nbytes_of
    from pymesh.proto import bencode

    tensors = [TensorBlob(d, tuple(shape), memoryview(bytes(nbytes_of(d, shape)))) for d, shape in blobs]
    env: dict[str, object] = {}
    if name:
        env["n"] = name
    if meta:
        env["u"] = meta
    if tensors:
        env["t"] = [[t.dtype, list(t.shape)] for t in tensors]
    if code:
        env["c"] = code
    if message:
        env["x"] = message
    assert encode_envelope(name, meta, tensors, code, message) == (bencode.encode(env) if env else b"")


# --------------------------------------------------------------------------- streamed reads


class _BytesReader:
    """A FrameReader over bytes in memory; running out is a truncated frame."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise FrameError(f"truncated frame: {len(self.data) - self.pos} of {n} bytes")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    async def read_exact(self, n: int) -> bytes:
        return bytes(self._take(n))

    async def readinto_exact(self, view: memoryview) -> None:
        view[:] = self._take(len(view))


class _Ledger:
    """A ReceiveBudget that records what it was asked for."""

    def __init__(self) -> None:
        self.admitted: list[int] = []
        self.grown: list[int] = []

    async def admit(self, payload_len: int) -> None:
        self.admitted.append(payload_len)

    async def grow(self, nbytes: int) -> None:
        self.grown.append(nbytes)


def _read(data: bytes, limits: FrameLimits, budget: _Ledger | None = None, **kw: object) -> Frame:
    async def main() -> Frame:
        return await read_frame_untrusted(_BytesReader(data), limits, budget=budget, **kw)  # type: ignore[arg-type]
    return trio.run(main)


def test_handshake_limits_refuse_tensors_and_large_metadata() -> None:
    hello = encode_frame(FrameType.HELLO, 0, meta={"v": 1, "id": bytes(32), "n": bytes(32)})
    assert _read(hello, HANDSHAKE_LIMITS).envelope.meta["v"] == 1
    with_tensor = encode_frame(FrameType.AUTH, 0, meta={"v": 1}, tensors=[TensorBlob("uint8", (1,), memoryview(b"x"))])
    with pytest.raises(FrameError, match="handshake"):
        _read(with_tensor, HANDSHAKE_LIMITS)
    big = HEADER.pack(MAGIC, 1, FrameType.AUTH, 0, 0, 10, 512 << 20)
    with pytest.raises(FrameError, match="no tensors"):
        decode_header_untrusted(big, HANDSHAKE_LIMITS)
    with pytest.raises(FrameError, match="handshake"):
        decode_header_untrusted(HEADER.pack(MAGIC, 1, FrameType.HELLO, 0, 0, 5000, 0), HANDSHAKE_LIMITS)


def test_payload_is_committed_in_pieces_as_it_is_read() -> None:
    n = 2 * RECV_COMMIT_CHUNK + 5
    payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
    data = encode_frame(FrameType.CALL, 1, name="m", tensors=[
        TensorBlob("uint8", (n,), memoryview(payload)), TensorBlob("uint8", (3,), memoryview(b"abc"))])
    ledger = _Ledger()
    frame = _read(data, FrameLimits(max_frame_bytes=4 * RECV_COMMIT_CHUNK), ledger)
    assert ledger.admitted == [n + 3]
    assert ledger.grown == [RECV_COMMIT_CHUNK, RECV_COMMIT_CHUNK, 5, 3]
    assert bytes(frame.tensors[0].data) == payload and bytes(frame.tensors[1].data) == b"abc"
    assert not frame.tensors[0].data.readonly
    # An allocator that commits at once is charged the whole tensor before it is called.
    ledger = _Ledger()
    frame = _read(data, FrameLimits(max_frame_bytes=4 * RECV_COMMIT_CHUNK), ledger,
                  alloc=lambda k: memoryview(bytearray(k)))
    assert ledger.grown == [n, 3] and bytes(frame.tensors[0].data) == payload


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=HEADER.size, max_size=HEADER.size), st.binary(max_size=200),
       st.sampled_from(["handshake", "session"]))
def test_fuzz_streamed_headers_raise_only_frame_error(head: bytes, rest: bytes, phase: str) -> None:
    """Random headers (magic and version forced valid half the time) read from a stream:
    only FrameError, and never a commit beyond the bytes that followed plus one piece."""
    if rest[:1] and rest[0] & 1:
        head = MAGIC + bytes([1]) + head[5:]
    limits = HANDSHAKE_LIMITS if phase == "handshake" else FrameLimits()
    ledger = _Ledger()
    try:
        frame = _read(head + rest, limits, ledger)
    except FrameError:
        pass
    else:
        assert sum(t.nbytes for t in frame.tensors) <= len(rest)
    assert sum(ledger.grown[:-1]) <= len(rest)
    assert all(g <= RECV_COMMIT_CHUNK for g in ledger.grown)
