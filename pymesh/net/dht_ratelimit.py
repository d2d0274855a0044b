"""Per-IP token-bucket rate limiting for the DHT's UDP socket.

Each source IP gets its own bucket (``rate`` datagrams per second, ``burst`` at once),
so one flooding address uses up only its own budget and others keep being answered.
The table of buckets is bounded: the least recently seen IPs are forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    def __init__(self, rate: float, burst: float, *, max_ips: int = 8192) -> None:
        self.rate = rate
        self.burst = burst
        self.max_ips = max_ips
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # ip -> [tokens, last]
        self.dropped = 0

    def allow(self, ip: str, now: float) -> bool:
        b = self._buckets.get(ip)
        if b is None:
            if len(self._buckets) >= self.max_ips:
                self._buckets.popitem(last=False)
            b = self._buckets[ip] = [self.burst, now]
        else:
            self._buckets.move_to_end(ip)
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        if b[0] >= 1.0:
            b[0] -= 1.0
            return True
        self.dropped += 1
        return False
