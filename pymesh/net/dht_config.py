"""Settings of a DHT node (:class:`DHTConfig`) and the error a KRPC error reply raises.

``pymesh.net.dht`` re-exports both; ``Settings.dht_config()`` fills the config from PYMESH_*.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pymesh.errors import RemoteProtocolError
from pymesh.proto.krpc import Addr

log = logging.getLogger(__name__)


@dataclass
class DHTConfig:
    """Knobs of a DHT node (defaults = the documented ones; ``Settings.dht_config()`` applies
    PYMESH_RECORD_TTL, PYMESH_HEARTBEAT and PYMESH_DHT_TIMEOUT)."""

    record_ttl: float = 300.0          # seconds a record lives without a refresh
    heartbeat: float = 60.0            # seconds between re-publications of own records
    rpc_timeout: float = 2.0           # seconds one query waits for its answer
    k: int = 8
    alpha: int = 3
    rate_limit: float = 400.0          # datagrams per second per source IP
    rate_burst: float = 800.0
    refresh_interval: float = 900.0    # stale-bucket refresh (BEP 5: 15 minutes)
    bootstrap_timeout: float = 10.0
    max_record_pages: int = 64         # per responder, when paging a large model
    max_record_pages_total: int = 256  # all responders of one read together
    max_pending_pings: int = 32
    read_only: bool = False            # BEP 43: send ro=1, answer no queries
    min_rpc_timeout: float = 0.25      # floor of the adaptive (4 x srtt) soft timeout in lookups
    offline_deadline: float = 2.0      # publishing offline records at shutdown: one try, this long

    def __post_init__(self) -> None:
        if self.record_ttl <= 0 or self.rpc_timeout <= 0:
            raise ValueError("record_ttl and rpc_timeout must be positive")
        if self.heartbeat <= 0 or self.heartbeat > self.record_ttl / 2:
            fixed = self.record_ttl / 3
            log.info("heartbeat %.1fs is not well inside the record TTL %.1fs; using %.1fs",
                     self.heartbeat, self.record_ttl, fixed)
            self.heartbeat = fixed


class DHTRemoteError(RemoteProtocolError):
    """A DHT peer answered a query with a KRPC error."""

    def __init__(self, addr: Addr, code: int, message: str) -> None:
        super().__init__(f"DHT node {addr[0]}:{addr[1]} refused the query: error {code} {message}")
        self.code = code
        self.remote_message = message
