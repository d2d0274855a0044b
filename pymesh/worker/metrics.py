"""``pymesh worker --metrics-listen ADDR``: the worker's counters in Prometheus text format.

A collector reads the service's counters and session table at each scrape (nothing is
counted twice, nothing runs between scrapes); prometheus-client's own HTTP server serves it
from a daemon thread. ``ADDR`` is ``PORT`` (bound to 127.0.0.1) or ``HOST:PORT``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from pymesh.errors import ConfigError

if TYPE_CHECKING:
    from pymesh.worker.server import Worker


def parse_listen(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--metrics-listen {addr!r}: give PORT or HOST:PORT (e.g. 127.0.0.1:9400)")
    return host.strip("[]") or "127.0.0.1", int(port)


class WorkerCollector:
    """Counters of one :class:`~pymesh.worker.server.Worker` (empty until its service runs)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        service = self.worker._service
        if service is None:
            return
        c, t = dict(service.counters), service.table
        sessions = list(t.sessions.values())
        for name, help_text in (("steps", "steps computed"), ("from_client", "steps received from clients"),
                                ("from_peer", "steps received from the previous worker"),
                                ("replayed", "steps replayed during client recoveries"),
                                ("errors", "steps that failed"),
                                ("receipts_signed", "step receipts signed (sessions opened with receipts)"),
                                ("bad_receipts", "pushed steps refused for a missing, forged or mismatched receipt"),
                                ("corrupted", "steps corrupted on purpose (test faults only)")):
            yield CounterMetricFamily(f"pymesh_worker_{name}", help_text, value=c.get(name, 0))
        yield CounterMetricFamily("pymesh_worker_compute_seconds", "time spent computing steps",
                                  value=c.get("compute_us", 0) / 1e6)
        yield CounterMetricFamily("pymesh_worker_refused_sessions", "sessions refused for lack of cache",
                                  value=t.refused)
        yield CounterMetricFamily("pymesh_worker_expired_sessions", "sessions closed after their idle timeout",
                                  value=t.expired)
        rows = service.forward_rows
        yield HistogramMetricFamily("pymesh_worker_forward_rows", "rows (batch x positions) per forward computed: "
                                    "1 per sequence for a decode step, more for a prefill chunk",
                                    buckets=[(le, float(n)) for le, n in rows.cumulative()], sum_value=rows.total)
        yield GaugeMetricFamily("pymesh_worker_sessions", "open sessions", value=len(sessions))
        yield GaugeMetricFamily("pymesh_worker_batch_rows", "batch rows of the open sessions (sum of their "
                                "batch sizes)", value=sum(s.batch for s in sessions))
        yield GaugeMetricFamily("pymesh_worker_cache_tokens_total", "KV-cache budget in tokens",
                                value=t.budget_tokens)
        yield GaugeMetricFamily("pymesh_worker_cache_tokens_free", "KV-cache tokens not reserved",
                                value=t.free_tokens)
        yield GaugeMetricFamily("pymesh_worker_blocks", "blocks served", value=service.runtime.stop - service.runtime.start)


def start_metrics(addr: str, worker: Worker) -> Any:
    """Serve the worker's metrics at ``addr`` from a daemon thread; returns the HTTP server."""
    from prometheus_client import CollectorRegistry, start_http_server

    host, port = parse_listen(addr)
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker))
    server, _thread = start_http_server(port, host, registry=registry)
    return server
