"""A flood of QUIC Initials cannot lock honest clients out (issue 11, item 3).

Before: any datagram with a parseable Initial header took one of 256 pending slots for
the connect timeout, garbage payload or not; 256 of them locked out every new connection.
Now an Initial takes a slot only once it decrypts, each source address has a budget of
Initials examined per second and a cap on pending handshakes, and under load a client
must echo a Retry token first (address validation).
"""

from __future__ import annotations

import os
import socket
import ssl
import struct

import pytest
import trio
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.errors import RemoteProtocolError
from pymesh.net.config import ALPN
from pymesh.net.quic_admission import InitialGate
from pymesh.net.quic_endpoint import QuicEndpoint
from pymesh.net.rpc import CallContext, RpcNode
from pymesh.proto.frames import Meta, TensorBlob
from pymesh.proto.identity import Identity
from pymesh.proto.retry_tokens import BadRetryToken, RetryTokens
from tests.net.helpers import fast_config

FLOOD_FROM = "127.0.0.2"     # the attacker; honest clients use 127.0.0.1


async def echo(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
    return meta, tensors


def garbage_initial(payload: bytes | None = None) -> bytes:
    """A datagram with a valid QUIC v1 Initial header and a random (undecryptable) payload."""
    head = bytes([0xC3]) + struct.pack(">I", 1) + bytes([8]) + os.urandom(8) + bytes([8]) + os.urandom(8) + b"\x00"
    if payload is None:
        payload = os.urandom(1200 - len(head) - 2)
    return head + struct.pack(">H", 0x4000 | len(payload)) + payload


def valid_initial(port: int) -> bytes:
    """A real client's first Initial (a ClientHello that decrypts), from a connection
    nobody continues."""
    cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
    quic = QuicConnection(configuration=cfg)
    quic.connect(("127.0.0.1", port), now=0.0)
    data, _ = quic.datagrams_to_send(now=0.0)[0]
    return data


async def _flood(port: int, datagrams: list[bytes]) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((FLOOD_FROM, 0))
    for i, d in enumerate(datagrams):
        await sock.sendto(d, ("127.0.0.1", port))
        if i % 64 == 63:
            await trio.sleep(0.01)  # let the endpoint drain (a test of slots, not of kernel buffers)
    sock.close()


async def _honest_call(port: int, server: RpcNode) -> None:
    async with RpcNode(Identity.generate(), transport="quic", config=fast_config()) as client:
        with trio.fail_after(20):
            conn = await client.connect("127.0.0.1", port, server.peer_id)
            meta, _ = await conn.call("echo", {"honest": 1}, timeout=10)
    assert meta == {"honest": 1}


def _endpoint(node: RpcNode) -> QuicEndpoint:
    assert node._endpoint is not None
    return node._endpoint


@pytest.mark.timeout(60)
def test_garbage_initials_hold_no_slot_and_honest_clients_connect() -> None:
    async def main() -> None:
        async with RpcNode(Identity.generate(), transport="quic", config=fast_config()) as server:
            server.register("echo", echo)
            port = await server.listen("127.0.0.1", 0)
            ep = _endpoint(server)
            ep.gate = InitialGate(source_rate=1e6, source_burst=1e6)  # every one reaches the decrypt check
            ep.counters = ep.gate.counters
            await _flood(port, [garbage_initial() for _ in range(600)])  # > the 256 slots of before
            with trio.fail_after(10):
                while ep.gate.counters["undecryptable"] < 300:
                    await trio.sleep(0.05)
            assert ep.gate.pending == 0, "a packet that never decrypted holds a pending slot"
            assert ep.gate.counters["accepted"] == 0
            await _honest_call(port, server)
            assert ep.gate.counters["accepted"] == 1 and ep.gate.pending == 0

    trio.run(main)


@pytest.mark.timeout(60)
def test_one_source_is_capped_and_budgeted() -> None:
    """Initials that decrypt, from one address that never finishes a handshake: it holds at
    most ``per_source`` slots, beyond its budget it is not even decrypted; honest clients
    on another address still connect."""
    async def main() -> None:
        async with RpcNode(Identity.generate(), transport="quic", config=fast_config()) as server:
            server.register("echo", echo)
            port = await server.listen("127.0.0.1", 0)
            ep = _endpoint(server)
            await _flood(port, [valid_initial(port) for _ in range(150)] + [garbage_initial() for _ in range(300)])
            with trio.fail_after(10):
                while sum(ep.gate.counters.values()) < 300:
                    await trio.sleep(0.05)
            assert ep.gate.pending_from((FLOOD_FROM, 0)) <= ep.gate.per_source
            assert ep.gate.counters["source_cap"] > 0 and ep.gate.counters["over_budget"] > 0
            await _honest_call(port, server)

    trio.run(main)


@pytest.mark.timeout(60)
def test_under_load_clients_are_validated_with_retry() -> None:
    """With the load threshold at 0 every new client must echo a Retry token: a spoofed
    Initial (nobody reads the Retry) takes no slot; aioquic's client follows the Retry."""
    async def main() -> None:
        async with RpcNode(Identity.generate(), transport="quic", config=fast_config()) as server:
            server.register("echo", echo)
            port = await server.listen("127.0.0.1", 0)
            ep = _endpoint(server)
            ep.gate.retry_above = 0
            await _flood(port, [valid_initial(port) for _ in range(20)])
            with trio.fail_after(10):
                while ep.gate.counters["retry_sent"] < 20:
                    await trio.sleep(0.05)
            assert ep.gate.pending == 0 and ep.gate.counters["accepted"] == 0
            await _honest_call(port, server)
            assert ep.gate.counters["retry_sent"] >= 21 and ep.gate.counters["accepted"] == 1

    trio.run(main)


# ---------------------------------------------------------------------- retry tokens


def test_retry_token_binds_address_cid_and_time() -> None:
    tokens = RetryTokens(lifetime=10.0)
    tok = tokens.issue(b"127.0.0.1|5000", b"odcid123", b"scid5678", now=100.0)
    assert tokens.validate_untrusted(tok, b"127.0.0.1|5000", b"scid5678", now=105.0) == b"odcid123"
    for addr, dcid, now in [(b"127.0.0.1|5001", b"scid5678", 105.0), (b"127.0.0.1|5000", b"scid5679", 105.0),
                            (b"127.0.0.1|5000", b"scid5678", 111.0), (b"127.0.0.1|5000", b"scid5678", 99.0)]:
        with pytest.raises(BadRetryToken):
            tokens.validate_untrusted(tok, addr, dcid, now)
    with pytest.raises(BadRetryToken):
        RetryTokens().validate_untrusted(tok, b"127.0.0.1|5000", b"scid5678", now=105.0)  # another secret


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.binary(max_size=20))
def test_retry_token_parser_raises_one_error_type(token: bytes, dcid: bytes) -> None:
    try:
        RetryTokens(secret=b"k" * 32).validate_untrusted(token, b"a", dcid, now=1.0)
    except RemoteProtocolError as exc:
        assert isinstance(exc, BadRetryToken)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1200, max_size=1300))
def test_gate_on_random_initials_only_drops(data: bytes) -> None:
    from aioquic.buffer import Buffer  # type: ignore[attr-defined]
    from aioquic.quic.packet import pull_quic_header

    data = garbage_initial(data)  # a valid header in front of random bytes
    buf = Buffer(data=data)
    try:
        header = pull_quic_header(buf, host_cid_length=8)
    except ValueError:
        return
    gate = InitialGate()
    assert gate.decide_untrusted(data, header, buf.tell(), ("127.0.0.9", 1), now=1.0).verdict.value == "drop"
    assert gate.pending == 0
