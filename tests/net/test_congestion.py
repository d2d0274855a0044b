"""The pymesh-delay congestion controller as a pure state machine (no sockets)."""

from __future__ import annotations

from aioquic.quic.congestion.base import create_congestion_control
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import Epoch

from pymesh.net import congestion

MSS = 1200


def packet(n: int, sent_time: float) -> QuicSentPacket:
    return QuicSentPacket(epoch=Epoch.ONE_RTT, in_flight=True, is_ack_eliciting=True, is_crypto_packet=False,
                          packet_number=n, packet_type=QuicPacketType.ONE_RTT, sent_time=sent_time,
                          sent_bytes=MSS)


def run_rounds(cc: congestion.DelayBasedCongestionControl, rounds: int, rtt: float, start: float = 0.0,
               first: int = 0) -> tuple[float, int]:
    """Send a window per round trip and ACK all of it after ``rtt``."""
    now, n = start, first
    for _ in range(rounds):
        batch = [packet(n + i, now) for i in range(max(1, cc.congestion_window // MSS))]
        n += len(batch)
        for p in batch:
            cc.on_packet_sent(packet=p)
        now += rtt
        for p in batch:
            cc.on_rtt_measurement(now=now, rtt=rtt)
            cc.on_packet_acked(now=now, packet=p)
    return now, n


def new() -> congestion.DelayBasedCongestionControl:
    cc = create_congestion_control(congestion.NAME, max_datagram_size=MSS)
    assert isinstance(cc, congestion.DelayBasedCongestionControl)
    return cc


def test_registered_and_grows_while_the_queue_is_empty() -> None:
    cc = new()
    start = cc.congestion_window
    run_rounds(cc, 6, rtt=0.020)
    assert cc.congestion_window >= start * 16  # slow start doubles per round trip
    assert cc.bytes_in_flight == 0


def test_random_loss_costs_little_congestive_loss_halves() -> None:
    cc = new()
    now, n = run_rounds(cc, 6, rtt=0.020)
    before = cc.congestion_window
    lost = packet(n, now)
    cc.on_packet_sent(packet=lost)
    cc.on_packets_lost(now=now + 0.03, packets=[lost])   # no queueing delay: random loss
    assert cc.congestion_window == int(before * congestion.RANDOM_LOSS_FACTOR)

    cc2 = new()
    now, n = run_rounds(cc2, 6, rtt=0.020)
    now, n = run_rounds(cc2, 3, rtt=0.080, start=now, first=n)   # a standing queue of 60 ms
    before = cc2.congestion_window
    lost = packet(n, now)
    cc2.on_packet_sent(packet=lost)
    cc2.on_packets_lost(now=now + 0.1, packets=[lost])
    assert cc2.congestion_window == max(int(before * congestion.CONGESTION_LOSS_FACTOR), 2 * MSS)


def test_queueing_delay_over_target_shrinks_the_window() -> None:
    cc = new()
    now, n = run_rounds(cc, 6, rtt=0.020)
    peak = cc.congestion_window
    run_rounds(cc, 6, rtt=0.120, start=now, first=n)   # 100 ms of queueing, far over target
    assert cc.congestion_window < peak


def test_one_reduction_per_loss_event() -> None:
    cc = new()
    now, n = run_rounds(cc, 5, rtt=0.020)
    a, b = packet(n, now), packet(n + 1, now)
    cc.on_packet_sent(packet=a)
    cc.on_packet_sent(packet=b)
    cc.on_packets_lost(now=now + 0.03, packets=[a])
    once = cc.congestion_window
    cc.on_packets_lost(now=now + 0.031, packets=[b])  # sent before the first reduction: same event
    assert cc.congestion_window == once
