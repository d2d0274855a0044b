"""What address the internet sees this node at, believed only when several peers agree.

Every KRPC response may carry BEP 42's ``ip`` key: the address the responder saw the
query come from. One responder can lie (or sit on the same LAN and see a private
address), so :class:`ObservedAddress` keeps the latest report of each reporter and
believes an address only when

* at least ``min_reporters`` distinct reporters (node ids) said it within ``window``
  seconds,
* they sit on at least ``min_ips`` distinct reporter IPs (one host with many node ids
  cannot decide it; one IP holds at most ``per_ip`` reports at a time), and
* it is the strict majority of the counted reports.

Which reports count: reports from public reporters only, as soon as there is one;
reports from private, loopback or link-local reporters count only while every reporter
is on such a network (a LAN or a loopback test swarm). On loopback every node shares the
IP 127.0.0.1, so a loopback reporter's "host" is its ip:port (test swarms still reach a
belief; loopback reporters never count once a public one is heard).

Agreement is on the IP. The port tells the NAT's mapping: an endpoint-independent
mapping shows every reporter the same port (``mapping == "stable"`` when one port is the
strict majority of the agreeing reports and has ``min_reporters`` of them: the belief
carries that port), a symmetric NAT shows each destination a different one (``"varies"``:
the belief carries port 0, no port can be announced); ``"unknown"`` while there is no belief.
A change of belief is logged (INFO) and passed to ``on_change``. Memory is bounded:
at most ``max_reporters`` reporters are kept (the least recently heard dropped first).
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Literal

from pymesh.proto.krpc import Addr

log = logging.getLogger(__name__)

Mapping = Literal["stable", "varies", "unknown"]

#: Defaults: 3 reporters on 2 IPs within 10 minutes; 256 reporters kept, 2 per IP.
MIN_REPORTERS = 3
MIN_IPS = 2
WINDOW = 600.0
MAX_REPORTERS = 256
PER_IP = 2


def is_public(ip: str) -> bool:
    """True for a globally routable IP address (not private, loopback, link-local, CGNAT...)."""
    try:
        return ipaddress.ip_address(ip).is_global
    except ValueError:
        return False


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class _Report:
    host: str         # the reporter's IP (ip:port on loopback)
    public: bool      # the reporter's IP is globally routable
    observed: Addr
    at: float


class ObservedAddress:
    def __init__(self, *, min_reporters: int = MIN_REPORTERS, min_ips: int = MIN_IPS, window: float = WINDOW,
                 max_reporters: int = MAX_REPORTERS, per_ip: int = PER_IP,
                 on_change: Callable[[Addr | None, Addr | None], None] | None = None) -> None:
        if min_reporters < 1 or min_ips < 1 or max_reporters < min_reporters or per_ip < 1:
            raise ValueError("ObservedAddress needs min_reporters, min_ips, per_ip >= 1 "
                             "and max_reporters >= min_reporters")
        self.min_reporters = min_reporters
        self.min_ips = min_ips
        self.window = window
        self.max_reporters = max_reporters
        self.per_ip = per_ip
        self.on_change = on_change
        self._reports: OrderedDict[bytes, _Report] = OrderedDict()  # node id -> latest, oldest first
        self._belief: Addr | None = None
        self._mapping: Mapping = "unknown"

    def __len__(self) -> int:
        return len(self._reports)

    @property
    def mapping(self) -> Mapping:
        return self._mapping

    def belief(self, now: float | None = None) -> Addr | None:
        """The believed public address ((ip, 0) when the port varies), or None. With ``now``,
        reports older than the window are dropped first (a change fires ``on_change``)."""
        if now is not None:
            self._expire(now)
            self._decide()
        return self._belief

    def report(self, reporter_id: bytes, reporter: Addr, observed: Addr, now: float) -> bool:
        """One verified response from ``reporter_id`` at ``reporter`` said it saw us at
        ``observed``. Returns True when the belief changed."""
        ip = reporter[0]
        host = f"{ip}:{reporter[1]}" if _is_loopback(ip) else ip
        self._reports.pop(reporter_id, None)
        same_host = [nid for nid, r in self._reports.items() if r.host == host]
        for nid in same_host[:max(0, len(same_host) + 1 - self.per_ip)]:
            del self._reports[nid]  # one IP keeps its most recent per_ip reporters
        self._reports[reporter_id] = _Report(host, is_public(ip), (observed[0], observed[1]), now)
        while len(self._reports) > self.max_reporters:
            self._reports.popitem(last=False)
        self._expire(now)
        return self._decide()

    def _expire(self, now: float) -> None:
        while self._reports:
            nid, r = next(iter(self._reports.items()))
            if now - r.at <= self.window:
                break
            del self._reports[nid]

    def _counted(self) -> list[_Report]:
        reports = list(self._reports.values())
        public = [r for r in reports if r.public]
        return public if public else reports

    def _decide(self) -> bool:
        counted = self._counted()
        by_ip = Counter(r.observed[0] for r in counted)
        belief: Addr | None = None
        mapping: Mapping = "unknown"
        if by_ip:
            ip, votes = by_ip.most_common(1)[0]
            agree = [r for r in counted if r.observed[0] == ip]
            if (2 * votes > len(counted) and votes >= self.min_reporters
                    and len({r.host for r in agree}) >= self.min_ips):
                port, port_votes = Counter(r.observed[1] for r in agree).most_common(1)[0]
                stable = port_votes >= self.min_reporters and 2 * port_votes > len(agree)
                mapping = "stable" if stable else "varies"
                belief = (ip, port if stable else 0)
        self._mapping = mapping
        if belief == self._belief:
            return False
        old, self._belief = self._belief, belief
        log.info("public address belief changed: %s -> %s (mapping %s, %d reporters counted)",
                 _fmt(old), _fmt(belief), mapping, len(counted))
        if self.on_change is not None:
            self.on_change(old, belief)
        return True


def _fmt(addr: Addr | None) -> str:
    return "none" if addr is None else f"{addr[0]}:{addr[1]}"


__all__ = ["ObservedAddress", "Mapping", "is_public"]
