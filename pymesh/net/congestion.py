"""``pymesh-delay``: a delay-based congestion controller for aioquic.

Loss-based controllers (Reno, CUBIC) halve their window on every loss event, so random
loss that has nothing to do with congestion (1% on a lossy path) keeps them near
``MSS / RTT x 1.2 / sqrt(p)`` — about 0.6 MB/s at 20 ms RTT. This controller takes
its congestion signal from queueing delay instead, in the spirit of LEDBAT / Vegas:

* ``base_rtt`` is the smallest RTT seen in the last ``BASE_WINDOW`` seconds; the queueing
  delay is the smallest RTT sample of the last round trip minus ``base_rtt`` (the
  per-round minimum filters out scheduling jitter of a busy host, as Vegas does); the
  target is ``max(20 ms, base_rtt / 2)``.
* Below the target the window grows: doubling per RTT until the delay first exceeds
  the target (slow start), then by up to ``GROWTH`` of itself per RTT in proportion to how far
  below target the delay is. Above the target it shrinks in proportion.
* A loss while the queueing delay is under the target is taken as random loss: the window shrinks by
  ``RANDOM_LOSS_FACTOR`` at most once per RTT. A loss with the delay over the
  target is congestion: the window halves and slow start ends, as in Reno.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aioquic.quic.congestion.base import K_MINIMUM_WINDOW, QuicCongestionControl, register_congestion_control
from aioquic.quic.packet_builder import QuicSentPacket

NAME = "pymesh-delay"
BASE_WINDOW = 10.0          # seconds over which the minimum RTT is remembered
MIN_TARGET = 0.020          # seconds of queueing delay tolerated (a busy Python receiver adds a few ms)
RANDOM_LOSS_FACTOR = 0.9
CONGESTION_LOSS_FACTOR = 0.5
GROWTH = 0.5                # fraction of the window added per RTT at full off-target


class DelayBasedCongestionControl(QuicCongestionControl):
    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._mss = max_datagram_size
        self._base_rtt: float | None = None
        self._base_rtt_at = 0.0
        self._filtered_rtt: float | None = None   # min RTT sample of the last completed round
        self._round_min: float | None = None
        self._round_start = 0.0
        self._slow_start = True
        self._recovery_start = 0.0
        self._stash = 0.0

    # ------------------------------------------------------------------ signals
    def _target(self) -> float:
        return max(MIN_TARGET, (self._base_rtt or 0.0) / 2)

    def _queue_delay(self) -> float:
        if self._base_rtt is None or self._filtered_rtt is None:
            return 0.0
        return max(0.0, self._filtered_rtt - self._base_rtt)

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        if self._round_min is None or rtt < self._round_min:
            self._round_min = rtt
        if now - self._round_start >= (self._base_rtt or rtt):
            self._filtered_rtt = self._round_min
            self._round_min = None
            self._round_start = now
        if self._base_rtt is None or rtt <= self._base_rtt or now - self._base_rtt_at > BASE_WINDOW:
            self._base_rtt = rtt
            self._base_rtt_at = now

    # ------------------------------------------------------------------ window
    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        self.bytes_in_flight += packet.sent_bytes

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        self.bytes_in_flight -= packet.sent_bytes
        if (packet.sent_time or 0.0) <= self._recovery_start:
            return
        target = self._target()
        off_target = (target - self._queue_delay()) / target   # 1 = empty queue, < 0 = over target
        if self._slow_start:
            if off_target > 0:
                self.congestion_window += packet.sent_bytes
                return
            self._slow_start = False
            self.ssthresh = self.congestion_window
        self._stash += GROWTH * max(off_target, -1.0) * packet.sent_bytes
        if abs(self._stash) >= 1:
            step = int(self._stash)
            self._stash -= step
            self.congestion_window = max(K_MINIMUM_WINDOW * self._mss, self.congestion_window + step)

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        lost_largest_time = 0.0
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            lost_largest_time = packet.sent_time or 0.0
        if lost_largest_time <= self._recovery_start:
            return  # same loss event (one reduction per round trip)
        self._recovery_start = now
        congested = self._queue_delay() > self._target()
        factor = CONGESTION_LOSS_FACTOR if congested else RANDOM_LOSS_FACTOR
        if congested:
            self._slow_start = False
        self.congestion_window = max(int(self.congestion_window * factor), K_MINIMUM_WINDOW * self._mss)
        if congested:
            self.ssthresh = self.congestion_window

    def on_persistent_congestion(self) -> None:
        self.congestion_window = K_MINIMUM_WINDOW * self._mss
        self._recovery_start = 0.0
        self._slow_start = False

    def get_log_data(self) -> dict[str, Any]:
        data = super().get_log_data()
        data["queue_delay_ms"] = round(self._queue_delay() * 1000, 2)
        return data


register_congestion_control(NAME, DelayBasedCongestionControl)
