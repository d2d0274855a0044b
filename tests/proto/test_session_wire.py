"""The session protocol schema: every message survives the real frame path, and nothing a
peer sends makes a parser raise anything but BadRequest."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymesh.errors import RemoteProtocolError
from pymesh.proto import session_wire as sw
from pymesh.proto import session_table as st_
from pymesh.proto.frames import FrameLimits, decode_envelope_untrusted, encode_envelope
from pymesh.proto.identity import PeerID
from pymesh.proto.vocab import Transport, WorkerState

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
sid = st.binary(min_size=1, max_size=sw.MAX_SID_BYTES)
peer = st.binary(min_size=32, max_size=32).map(PeerID)
block = st.integers(0, sw.MAX_BLOCK - 1)
count = st.integers(0, sw.MAX_COUNTER)
steps = st.lists(st.integers(0, sw.MAX_STEP), max_size=20).map(tuple)


@st.composite
def span(draw: Any) -> tuple[int, int]:
    start = draw(block)
    return start, draw(st.integers(start + 1, sw.MAX_BLOCK))


hint = st.builds(sw.AddrHint, st.text("abc.0123456789:", max_size=sw.MAX_HOST), st.integers(1, 65535),
                 st.sampled_from(Transport))
next_hop = st.none() | span().flatmap(
    lambda s: st.builds(sw.NextHop, peer, st.just(s[0]), st.just(s[1]), st.none() | hint))

MESSAGE = st.one_of(
    st.builds(sw.Info),
    span().flatmap(lambda s: st.builds(
        sw.InfoReply, peer, text, st.just(s[0]), st.just(s[1]), st.integers(0, 1 << 20),
        st.sampled_from(WorkerState), count, count, count)),
    st.builds(sw.Open, sid, st.integers(1, sw.MAX_SESSION_TOKENS), st.integers(1, sw.MAX_BATCH),
              st.none() | text, st.none() | block, st.none() | st.integers(1, sw.MAX_BLOCK), st.booleans(),
              st.integers(1, sw.MAX_COPY_EVERY), next_hop, st.none() | peer),
    span().flatmap(lambda s: st.builds(sw.OpenReply, st.just(s[0]), st.just(s[1]), count)),
    st.builds(sw.SetNext, sid, next_hop, st.none() | peer),
    st.builds(sw.CheckLink, sid),
    st.builds(sw.CheckLinkReply, st.booleans(), st.text(st.characters(blacklist_categories=("Cs",)),
                                                        max_size=sw.MAX_DETAIL)),
    st.builds(sw.Close, sid),
    st.builds(sw.CloseReply, st.booleans(), count),
    st.builds(sw.Flush, sid),
    span().flatmap(lambda s: st.builds(sw.FlushReply, steps, st.just(s[0]), st.just(s[1]))),
    st.builds(sw.Step, sid, st.integers(0, sw.MAX_STEP), st.integers(0, sw.MAX_SESSION_TOKENS)),
    st.builds(sw.Forward, sid, st.integers(0, sw.MAX_STEP), st.integers(0, sw.MAX_SESSION_TOKENS)),
    st.builds(sw.Empty),
    span().flatmap(lambda s: st.builds(sw.Out, sid, st.integers(0, sw.MAX_STEP), steps, st.booleans(),
                                       st.just(s[0]), st.just(s[1]))),
    span().flatmap(lambda s: st.builds(
        sw.Err, st.binary(max_size=sw.MAX_SID_BYTES), st.integers(-1, sw.MAX_STEP), st.sampled_from(sw.ErrorCode),
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=sw.MAX_MESSAGE), st.just(s[0]),
        st.just(s[1]), st.none() | peer, st.booleans())),
    st.builds(sw.Stats, st.none() | sid),
    span().flatmap(lambda s: st.builds(
        sw.StatsReply, *([count] * 11), st.just(s[0]), st.just(s[1]),
        st.none() | st.builds(sw.SessionCounters, count, count, count, count), count)),
)


def _over_the_wire(meta: dict[str, object]) -> dict[str, object]:
    """What a peer's handler receives: the frame envelope, bencoded and decoded untrusted."""
    env = decode_envelope_untrusted(encode_envelope("x", meta, []), 0, FrameLimits())
    return env.meta


@FAST
@given(MESSAGE)
def test_every_message_round_trips_through_a_frame(msg: Any) -> None:
    assert type(msg).from_meta_untrusted(_over_the_wire(msg.to_meta())) == msg


_junk = st.recursive(
    st.one_of(st.none(), st.integers(-5, 1 << 41), st.binary(max_size=40), text, st.booleans()),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=5)),
    max_leaves=12,
)
_keys = st.sampled_from(sorted({f.rstrip("?").split("?")[0] for m in st_.MESSAGES for f in m.fields} | {"x"}))


@FAST
@given(st.sampled_from([m.cls for m in st_.MESSAGES]), st.dictionaries(_keys, _junk, max_size=8) | _junk)
def test_junk_only_ever_raises_bad_request(cls: Any, meta: Any) -> None:
    try:
        cls.from_meta_untrusted(meta)
    except sw.BadRequest:
        pass


@FAST
@given(MESSAGE, st.data())
def test_a_mutated_field_parses_or_raises_bad_request(msg: Any, data: Any) -> None:
    meta = msg.to_meta()
    if not meta:
        return
    key = data.draw(st.sampled_from(sorted(meta)))
    meta[key] = data.draw(_junk)
    try:
        type(msg).from_meta_untrusted(meta)
    except sw.BadRequest:
        pass


def test_bad_request_is_a_remote_protocol_error() -> None:
    assert issubclass(sw.BadRequest, RemoteProtocolError)
    assert sw.ErrorCode.NEXT_UNREACHABLE == "next_unreachable" and str(sw.ErrorCode.REFUSED) == "refused"


def test_next_hop_names_a_peer_and_a_span_and_only_hints_an_address() -> None:
    p = PeerID(b"k" * 32)
    hop = sw.NextHop(p, 2, 4, sw.AddrHint("10.0.0.1", 31337, Transport.TCP))
    meta = hop.to_meta()
    assert meta == {"peer": p.key, "start": 2, "stop": 4,
                    "hint": {"host": "10.0.0.1", "port": 31337, "transport": "tcp"}}
    with pytest.raises(sw.BadRequest, match="empty"):
        sw.NextHop.from_meta_untrusted({**meta, "stop": 2})
    with pytest.raises(sw.BadRequest, match="32-byte"):
        sw.NextHop.from_meta_untrusted({**meta, "peer": b"short"})
    with pytest.raises(sw.BadRequest, match="quic or tcp"):
        sw.NextHop.from_meta_untrusted({**meta, "hint": {"host": "h", "port": 1, "transport": "udp"}})
    # The old shape {peer, host, port, transport} has no span: refused, not guessed.
    with pytest.raises(sw.BadRequest, match="start"):
        sw.NextHop.from_meta_untrusted({"peer": p.key, "host": "h", "port": 1, "transport": "tcp"})


def test_open_defaults_match_what_the_worker_assumes() -> None:
    o = sw.Open.from_meta_untrusted({"sid": b"s", "max_tokens": 8})
    assert (o.batch, o.model, o.start, o.stop, o.reset, o.copies, o.next_hop) == (1, None, None, None, False, 1, None)
    with pytest.raises(sw.BadRequest, match="max_tokens"):
        sw.Open.from_meta_untrusted({"sid": b"s", "max_tokens": sw.MAX_SESSION_TOKENS + 1})
    with pytest.raises(sw.BadRequest, match="sid"):
        sw.Open.from_meta_untrusted({"sid": b"s" * (sw.MAX_SID_BYTES + 1), "max_tokens": 8})


def test_prev_and_link_are_optional_and_checked() -> None:
    p = PeerID(b"k" * 32)
    assert sw.Open.from_meta_untrusted({"sid": b"s", "max_tokens": 8}).prev is None
    assert sw.Open(b"s", 8, prev=p).to_meta()["prev"] == p.key
    assert sw.SetNext.from_meta_untrusted({"sid": b"s", "prev": p.key}).prev == p
    with pytest.raises(sw.BadRequest, match="prev"):
        sw.SetNext.from_meta_untrusted({"sid": b"s", "prev": b"short"})
    err = sw.Err(b"s", 1, sw.ErrorCode.NEXT_UNREACHABLE, "down", 0, 2, p, link=True)
    assert sw.Err.from_meta_untrusted(_over_the_wire(err.to_meta())).link
    assert "link" not in sw.Err(b"s", 1, sw.ErrorCode.INTERNAL, "x", 0, 2).to_meta()


def test_err_with_unknown_code_or_bad_blame_is_a_bad_request() -> None:
    base = sw.Err(b"", -1, sw.ErrorCode.INTERNAL, "boom", 0, 2).to_meta()
    assert base["blame"] == b"" and sw.Err.from_meta_untrusted(base).blame is None
    with pytest.raises(sw.BadRequest, match="error code"):
        sw.Err.from_meta_untrusted({**base, "code": "rm -rf"})
    with pytest.raises(sw.BadRequest, match="blame"):
        sw.Err.from_meta_untrusted({**base, "blame": b"x" * 5})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, 5000), max_size=5))
def test_hidden_shape_check_raises_only_bad_request(shape: list[int]) -> None:
    try:
        seq = sw.check_hidden_shape(tuple(shape), 576, 128)
    except sw.BadRequest:
        return
    assert len(shape) == 3 and shape[2] == 576 and 0 < seq <= 128


def test_the_table_lists_every_message_and_its_wire_fields() -> None:
    classes = {m.cls for m in st_.MESSAGES}
    public = {v for v in vars(sw).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
              and hasattr(v, "to_meta") and v.__module__ in (sw.__name__, "pymesh.proto.session_stats")
              and v not in (sw.NextHop,)}
    assert public - {sw.SessionRef, sw.StepRef} == classes
    for spec in st_.MESSAGES:
        assert spec.kind in ("call", "reply", "push")
        assert getattr(spec.cls, "TOPIC" if spec.kind == "push" else "METHOD", spec.name) == spec.name
        required = {f for f in spec.fields if "?" not in f}
        optional = {f.split("?")[0] for f in spec.fields if "?" in f}
        assert required <= set(_full(spec.cls).to_meta()) <= required | optional, spec.name


def _full(cls: Any) -> Any:
    """An instance with every optional field set (so to_meta shows every key)."""
    hop = sw.NextHop(PeerID(b"p" * 32), 1, 2)
    sample: dict[type, Any] = {
        sw.InfoReply: sw.InfoReply(PeerID(b"p" * 32), "m", 0, 1, 1, WorkerState.ONLINE, 1, 1, 0),
        sw.Open: sw.Open(b"s", 8, 1, "m", 0, 1, True, 2, hop, PeerID(b"q" * 32)),
        sw.OpenReply: sw.OpenReply(0, 1, 5),
        sw.SetNext: sw.SetNext(b"s", hop, PeerID(b"q" * 32)),
        sw.CheckLinkReply: sw.CheckLinkReply(True, "alive"),
        sw.CloseReply: sw.CloseReply(True, 1),
        sw.FlushReply: sw.FlushReply((1,), 0, 1),
        sw.Out: sw.Out(b"s", 1, (1,), True, 0, 1),
        sw.Err: sw.Err(b"s", 1, sw.ErrorCode.REFUSED, "m", 0, 1, PeerID(b"p" * 32), True),
        sw.Stats: sw.Stats(b"s"),
        sw.StatsReply: sw.StatsReply(*([0] * 11), 0, 1, sw.SessionCounters(0, 0, 0, 0)),
    }
    if cls in sample:
        return sample[cls]
    if issubclass(cls, sw.StepRef):
        return cls(b"s", 0, 0)
    if issubclass(cls, sw.SessionRef):
        return cls(b"s")
    return cls()
