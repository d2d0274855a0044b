"""pm_dialback in the sans-I/O core: the probe goes to the query's source only, rate limited."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.proto import dialback, krpc
from pymesh.proto.dht_core import DHTCore
from pymesh.proto.dialback import DialbackLimiter
from pymesh.proto.krpc import ErrorReply, KRPCError, Query, Response

NOW = 1_700_000_000.0
SRC = ("198.51.0.9", 4000)
ME = b"\x11" * 20
NONCE = b"n" * 16


@pytest.fixture
def core() -> DHTCore:
    return DHTCore(b"\x55" * 20, now=NOW, rng=random.Random(1))


def request(args: dict[bytes, object]) -> bytes:
    return krpc.encode_query(b"tx", dialback.DIALBACK, {b"id": ME, **args})


def test_probe_goes_to_the_observed_source_and_carries_the_nonce(core: DHTCore) -> None:
    inc = core.receive(request({b"nonce": NONCE}), SRC, NOW)
    assert inc.reply is not None and inc.probe is not None
    reply = krpc.decode_message_untrusted(inc.reply)
    assert isinstance(reply, Response) and reply.values[b"sent"] == 1 and reply.seen_ip == SRC
    dst, data = inc.probe
    assert dst == SRC
    probe = krpc.decode_message_untrusted(data)
    assert isinstance(probe, Query) and probe.method == dialback.PROBE and probe.read_only
    assert dialback.parse_nonce_untrusted(probe.args) == NONCE and probe.sender_id == core.node_id


def test_a_request_cannot_redirect_the_probe(core: DHTCore) -> None:
    victim = ("192.0.2.1", 53)
    evil = {b"nonce": NONCE, b"ip": krpc.pack_addr(victim), b"addr": krpc.pack_addr(victim),
            b"port": 53, b"host": b"192.0.2.1", b"target": krpc.pack_addr(victim) * 3 + b"\x00\x00"}
    inc = core.receive(request(evil), SRC, NOW)
    assert inc.probe is not None and inc.probe[0] == SRC


def test_one_probe_per_source_ip_per_interval(core: DHTCore) -> None:
    assert core.receive(request({b"nonce": NONCE}), SRC, NOW).probe is not None
    again = core.receive(request({b"nonce": NONCE}), (SRC[0], SRC[1] + 1), NOW + 5)  # same IP, other port
    assert again.probe is None and again.reply is not None
    msg = krpc.decode_message_untrusted(again.reply)
    assert isinstance(msg, ErrorReply) and msg.code == krpc.GENERIC_ERROR and "ask again later" in msg.message
    assert core.receive(request({b"nonce": NONCE}), ("198.51.0.10", 4000), NOW + 5).probe is not None
    assert core.receive(request({b"nonce": NONCE}), SRC, NOW + 10.5).probe is not None


def test_limiter_global_rate_and_bounded_table() -> None:
    lim = DialbackLimiter(interval=10.0, rate=5.0, burst=5.0, max_ips=8)
    sent = sum(lim.allow(f"10.0.{i // 256}.{i % 256}", 0.0) for i in range(1000))
    assert sent == 5 and len(lim) == 5  # the global burst
    sent = sum(lim.allow(f"10.1.{i // 256}.{i % 256}", 1.0 + i * 1e-3) for i in range(1000))
    assert len(lim) == 8 and sent == 3  # the table fills and then refuses: never forgets a recent IP
    assert not lim.allow("10.0.0.0", 9.0)  # still recent
    assert lim.allow("10.0.0.0", 10.5)  # aged out


def test_probe_arriving_is_reported_not_answered_nor_routed(core: DHTCore) -> None:
    probe = dialback.encode_probe(b"\x22" * 20, NONCE)
    inc = core.receive(probe, ("198.51.0.77", 51234), NOW)
    assert inc.probe_nonce == NONCE and inc.reply is None and inc.probe is None
    assert core.routing.get(b"\x22" * 20) is None
    ro = DHTCore(b"\x66" * 20, now=NOW, read_only=True)  # a read-only client can check itself too
    assert ro.receive(probe, ("198.51.0.77", 51234), NOW).probe_nonce == NONCE


def test_read_only_node_does_not_probe() -> None:
    ro = DHTCore(b"\x66" * 20, now=NOW, read_only=True)
    inc = ro.receive(request({b"nonce": NONCE}), SRC, NOW)
    assert inc.probe is None and inc.reply is None


@pytest.mark.parametrize("nonce", [None, b"", b"x" * 15, b"x" * 17, 7, [b"x" * 16]])
def test_bad_nonce_refused(core: DHTCore, nonce: object) -> None:
    args = {} if nonce is None else {b"nonce": nonce}
    inc = core.receive(request(args), SRC, NOW)
    assert inc.probe is None and inc.reply is not None
    msg = krpc.decode_message_untrusted(inc.reply)
    assert isinstance(msg, ErrorReply) and msg.code == krpc.PROTOCOL_ERROR
    bad_probe = krpc.encode_query(b"pb", dialback.PROBE, {b"id": ME, **args}, read_only=True)
    got = core.receive(bad_probe, SRC, NOW)
    assert got.probe_nonce is None and got.reply is None and got.error


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([b"id", b"nonce", b"ip", b"port"]),
                       st.binary(max_size=40) | st.integers(-5, 2**64) | st.lists(st.binary(max_size=20), max_size=3)))
def test_fuzzed_nonce_arguments_raise_only_krpc_error(args: dict) -> None:  # type: ignore[type-arg]
    try:
        assert len(dialback.parse_nonce_untrusted(args)) == dialback.NONCE_LEN
    except KRPCError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_fuzzed_dialback_datagrams_never_raise(tail: bytes) -> None:
    c = DHTCore(b"\x55" * 20, now=NOW, rng=random.Random(1))
    for data in (request({b"nonce": tail}), dialback.encode_probe(ME, tail),
                 b"d1:ad2:id20:" + ME + b"5:nonce" + tail + b"e1:q11:pm_dialback1:t2:tx1:y1:qe"):
        inc = c.receive(data, SRC, NOW)
        if inc.probe is not None:
            assert inc.probe[0] == SRC
