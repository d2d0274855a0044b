"""Prometheus metrics of ``pymesh serve`` (``GET /metrics``), in a registry of their own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from pymesh.client.headbatch import HeadBatcher

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pymesh_api_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("pymesh_api_prompt_tokens", "prompt tokens of finished generations",
                                     registry=r)
        self.tokens = Counter("pymesh_api_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("pymesh_api_ttft_seconds", "time from admission to the first token",
                              buckets=_LATENCY, registry=r)
        self.inter_token = Histogram("pymesh_api_inter_token_seconds", "time between consecutive tokens",
                                     buckets=_LATENCY, registry=r)
        self.recoveries = Counter("pymesh_api_recoveries", "session recoveries (a worker failed mid-request)",
                                  registry=r)
        self.route_changes = Counter("pymesh_api_route_changes", "requests that ended on another route than "
                                     "they started on", registry=r)
        self.rejected = Counter("pymesh_api_queue_rejections", "requests refused with 429: queue full",
                                registry=r)
        self.active = Gauge("pymesh_api_active_generations", "generations running", registry=r)
        self.head_rows = Histogram("pymesh_api_head_batch_rows", "rows per pass of the client's LM head "
                                   "(sessions whose tokens were picked together)",
                                   buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.waiting = Gauge("pymesh_api_waiting_requests", "requests waiting for a generation slot", registry=r)

    def watch(self, batcher: "HeadBatcher") -> None:
        """Count the rows of each pass of the client's LM head (``pymesh_api_head_batch_rows``)."""
        batcher.observers.append(lambda rows, _seconds: self.head_rows.observe(rows))
