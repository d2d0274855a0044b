"""ObservedAddress: a public address is believed only when several distinct peers agree."""

from __future__ import annotations

import logging

import pytest

from pymesh.proto.krpc import Addr
from pymesh.proto.observed import ObservedAddress, is_public

ME = ("203.0.113.7", 40000)


def nid(i: int) -> bytes:
    return i.to_bytes(20, "big")


def pub(i: int) -> Addr:
    """A public reporter address, one IP per i."""
    return (f"198.51.{i // 250}.{i % 250 + 1}", 6881)


def test_needs_three_reporters_on_two_ips() -> None:
    o = ObservedAddress()
    assert not o.report(nid(1), pub(1), ME, 0.0)
    assert not o.report(nid(2), pub(2), ME, 1.0)
    assert o.belief() is None and o.mapping == "unknown"
    assert o.report(nid(3), pub(3), ME, 2.0)
    assert o.belief() == ME and o.mapping == "stable"


def test_one_host_with_many_ids_cannot_decide() -> None:
    o = ObservedAddress()
    for i in range(50):  # one IP, fifty node ids, all saying the same thing
        o.report(nid(i), pub(1), ME, float(i))
    assert o.belief() is None
    assert len(o) == 2  # one IP keeps only its latest per_ip reporters
    o.report(nid(100), pub(2), ME, 60.0)  # a second IP: 3 reporters on 2 IPs now
    assert o.belief() == ME


def test_needs_a_strict_majority() -> None:
    o = ObservedAddress()
    liar = ("192.0.2.66", 1234)
    for i in range(3):
        o.report(nid(i), pub(i), ME, 0.0)
    assert o.belief() == ME
    for i in range(3, 6):  # as many reporters say otherwise: no clear majority
        o.report(nid(i), pub(i), liar, 1.0)
    assert o.belief() is None
    o.report(nid(6), pub(6), ME, 2.0)
    assert o.belief() == ME


def test_reports_expire_after_the_window() -> None:
    o = ObservedAddress(window=100.0)
    for i in range(3):
        o.report(nid(i), pub(i), ME, float(i))
    assert o.belief(50.0) == ME
    assert o.belief(101.5) is None  # the reports at 0 and 1 aged out: one left
    assert len(o) == 1


def test_latest_report_of_a_reporter_replaces_its_earlier_one() -> None:
    o = ObservedAddress()
    moved = ("203.0.113.99", 50000)
    for i in range(3):
        o.report(nid(i), pub(i), ME, 0.0)
    for i in range(3):  # the NAT's public address changed; the same peers now see the new one
        o.report(nid(i), pub(i), moved, 10.0)
    assert o.belief() == moved and len(o) == 3


def test_flood_of_fake_ids_stays_bounded_and_cannot_evict_everyone() -> None:
    o = ObservedAddress(max_reporters=64)
    for i in range(3):
        o.report(nid(i), pub(i), ME, 0.0)
    fake = ("192.0.2.1", 9)
    for i in range(10_000):  # one attacker IP, ten thousand ids
        o.report(nid(1000 + i), ("192.0.2.200", 6881), fake, 1.0 + i * 1e-4)
    assert len(o) <= 64
    assert o.belief() == ME
    for i in range(10_000):  # many attacker IPs: memory stays capped; they may outvote, never grow it
        o.report(nid(20_000 + i), pub(300 + i), fake, 3.0 + i * 1e-4)
    assert len(o) == 64


def test_private_reporters_do_not_count_once_a_public_one_is_heard() -> None:
    o = ObservedAddress()
    lan = ("192.168.1.10", 5000)
    for i in range(3):  # LAN peers: they see our LAN address
        o.report(nid(i), (f"192.168.1.{20 + i}", 6881), lan, 0.0)
    assert o.belief() == lan  # every reporter is private: a LAN swarm believes the LAN address
    o.report(nid(10), pub(10), ME, 1.0)
    assert o.belief() is None  # public reporters only now, and one is not enough
    o.report(nid(11), pub(11), ME, 2.0)
    o.report(nid(12), pub(12), ME, 3.0)
    assert o.belief() == ME


def test_loopback_swarm_reaches_a_belief() -> None:
    o = ObservedAddress()
    me = ("127.0.0.1", 7001)
    for i in range(3):  # every test node is 127.0.0.1 on its own port
        o.report(nid(i), ("127.0.0.1", 7100 + i), me, 0.0)
    assert o.belief() == me and o.mapping == "stable"


def test_symmetric_nat_shows_a_varying_port() -> None:
    o = ObservedAddress()
    for i in range(5):  # each destination sees a different public port
        o.report(nid(i), pub(i), (ME[0], 30000 + i), float(i))
    assert o.belief() == (ME[0], 0) and o.mapping == "varies"


def test_one_odd_port_does_not_flip_a_stable_mapping() -> None:
    o = ObservedAddress()
    for i in range(4):
        o.report(nid(i), pub(i), ME, 0.0)
    o.report(nid(9), pub(9), (ME[0], 1), 1.0)
    assert o.belief() == ME and o.mapping == "stable"


def test_change_event_and_log(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[Addr | None, Addr | None]] = []
    o = ObservedAddress(on_change=lambda old, new: seen.append((old, new)), window=10.0)
    with caplog.at_level(logging.INFO, logger="pymesh.proto.observed"):
        for i in range(4):
            o.report(nid(i), pub(i), ME, 0.0)
        o.belief(20.0)
    assert seen == [(None, ME), (ME, None)]
    assert sum("public address belief changed" in r.getMessage() for r in caplog.records) == 2


def test_is_public() -> None:
    assert is_public("8.8.8.8") and is_public("203.0.114.1")
    assert not any(is_public(ip) for ip in ("10.0.0.1", "192.168.0.1", "127.0.0.1", "169.254.1.1",
                                            "100.64.0.1", "not an ip"))


def test_bad_parameters_refused() -> None:
    with pytest.raises(ValueError):
        ObservedAddress(min_reporters=0)
    with pytest.raises(ValueError):
        ObservedAddress(max_reporters=2, min_reporters=3)
