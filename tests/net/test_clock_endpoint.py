"""The injectable clock (TrioClock under a virtual clock) and the QUIC endpoint's CID routing."""

from __future__ import annotations

import socket
import time

import trio
import trio.testing

from pymesh.net.clock import FakeClock, TrioClock
from pymesh.net.quic_driver import QuicDriver
from pymesh.net.quic_endpoint import QuicEndpoint


def test_trio_clock_moves_wall_time_with_virtual_time_and_shares_its_anchor() -> None:
    async def main() -> None:
        a = TrioClock()
        wall0, mono0 = a.wall(), a.monotonic()
        assert abs(wall0 - time.time()) < 5
        await trio.sleep(3600)  # an hour of virtual time, no real wait
        b = TrioClock()         # created later in the same run: agrees with the first
        assert a.monotonic() - mono0 == 3600
        assert a.wall() - wall0 == 3600 and b.wall() == a.wall()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert abs(TrioClock().wall() - time.time()) < 1  # outside trio.run: the system clock


def test_fake_clock_moves_by_hand() -> None:
    c = FakeClock(start=10.0, wall_start=1000.0)
    c.advance(2.5)
    assert (c.monotonic(), c.wall()) == (12.5, 1002.5)


def test_endpoint_routes_registered_cids_and_forgets_only_its_own() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    endpoint = QuicEndpoint(sock, None, None, send_buffer=1 << 20)
    try:
        first, second = object.__new__(QuicDriver), object.__new__(QuicDriver)
        endpoint.register_cid(b"c" * 8, first)
        assert endpoint.by_cid[b"c" * 8] is first
        endpoint.register_cid(b"c" * 8, second)   # the ID moved to another connection
        endpoint.forget_cid(b"c" * 8, first)      # the old owner's clean-up leaves it alone
        assert endpoint.by_cid[b"c" * 8] is second
        endpoint.forget_cid(b"c" * 8, second)
        assert b"c" * 8 not in endpoint.by_cid
        endpoint.forget_cid(b"x" * 8, second)     # unknown: no error
    finally:
        sock.close()
