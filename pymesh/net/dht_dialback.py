"""The trio side of the dial-back check (:mod:`pymesh.proto.dialback`): ask, wait, probe.

``DHTNode.dialback_check(addr)`` sends ``pm_dialback`` with a fresh random nonce to the
node at ``addr`` and waits up to ``timeout`` seconds for that node's probe carrying the
nonce. The answering side (:func:`send_probe`) sends the probe from a throwaway UDP
socket bound to an ephemeral port, so it reaches the requester only if an unsolicited
sender can. A DHTRemoteError (e.g. the asked node's rate limit) or PeerUnavailable from
the query means "not checked", not "unreachable": ask another node.
"""

from __future__ import annotations

import logging
import os
import socket as _socket
from dataclasses import dataclass

import trio

from pymesh.errors import LocalProtocolError
from pymesh.net.dht_ops import DHTOps
from pymesh.proto import dialback
from pymesh.proto.krpc import Addr

log = logging.getLogger(__name__)

#: Concurrent checks one node runs at most (each holds one nonce).
MAX_CHECKS = 16


@dataclass(frozen=True)
class DialbackResult:
    reachable: bool              # the probe with our nonce arrived within the timeout
    observed: Addr | None        # the address the asked node saw us at (its reply's "ip")
    probe_from: Addr | None      # where the probe came from (a fresh port of the asked node)


def send_probe(bind_host: str, dst: Addr, data: bytes) -> None:
    """Send one datagram to ``dst`` from a fresh socket on an ephemeral port, then close it."""
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((bind_host, 0))
        sock.sendto(data, dst)
    except OSError as exc:  # a full buffer or an unroutable address: the probe is lost, as UDP may
        log.debug("dial-back probe to %s:%d failed: %s", dst[0], dst[1], exc)
    finally:
        sock.close()


class Dialback:
    def __init__(self, node: DHTOps, bind_host: str) -> None:
        self.node = node
        self.bind_host = bind_host
        self._waiting: dict[bytes, tuple[trio.Event, list[Addr]]] = {}

    def on_probe(self, nonce: bytes, src: Addr) -> None:
        """A probe arrived at our DHT socket: wake the check that sent this nonce, if any."""
        waiter = self._waiting.get(nonce)
        if waiter is None:
            log.debug("dial-back probe from %s:%d with an unknown nonce, dropped", *src)
            return
        if not waiter[1]:
            waiter[1].append(src)
        waiter[0].set()

    def on_request(self, dst: Addr, data: bytes) -> None:
        """The core accepted a pm_dialback: probe its source from a fresh socket."""
        send_probe(self.bind_host, dst, data)

    async def check(self, addr: Addr, *, timeout: float = 3.0) -> DialbackResult:
        """Ask the node at ``addr`` to probe us; raises PeerUnavailable / DHTRemoteError when
        it does not take the request (then nothing was learned)."""
        if len(self._waiting) >= MAX_CHECKS:
            raise LocalProtocolError(f"more than {MAX_CHECKS} dial-back checks at once; wait for one to finish")
        nonce = os.urandom(dialback.NONCE_LEN)
        event = trio.Event()
        box: list[Addr] = []
        self._waiting[nonce] = (event, box)
        try:
            resp = await self.node.query(addr, dialback.DIALBACK, {b"nonce": nonce})
            with trio.move_on_after(timeout):
                await event.wait()
        finally:
            del self._waiting[nonce]
        result = DialbackResult(bool(box), resp.seen_ip, box[0] if box else None)
        log.info("dial-back via %s:%d: %s (seen as %s)", addr[0], addr[1],
                 "reachable" if result.reachable else f"no probe within {timeout:.1f}s",
                 "unknown" if resp.seen_ip is None else f"{resp.seen_ip[0]}:{resp.seen_ip[1]}")
        return result


__all__ = ["Dialback", "DialbackResult", "send_probe"]
