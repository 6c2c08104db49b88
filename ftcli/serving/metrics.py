"""The server's Prometheus metrics, on a registry of its own (not the process-global one), so that
two apps in one process (the tests, the benchmark) never share or clash over counters.

    ftcli_requests_total{route,status}       every answered request
    ftcli_request_errors_total{route,status} those answered 4xx or 5xx
    ftcli_request_seconds{route}             latency, from the request's arrival to its answer
    ftcli_batch_size                         inputs (windows, for long_text: window) per forward pass
    ftcli_queue_inputs                       inputs waiting for a forward pass
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ftcli_requests", "Requests answered.", ["route", "status"], registry=self.registry)
        self.errors = Counter(
            "ftcli_request_errors", "Requests answered with a 4xx or 5xx status.", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "ftcli_request_seconds", "Seconds from a request's arrival to its answer.", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch})
        self.batch_size = Histogram(
            "ftcli_batch_size", "Inputs per forward pass.", buckets=[size for size in sizes if size <= max_batch],
            registry=self.registry,
        )
        self.queue = Gauge("ftcli_queue_inputs", "Inputs waiting for a forward pass.", registry=self.registry)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
