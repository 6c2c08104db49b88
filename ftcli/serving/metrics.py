"""The server's Prometheus metrics, on a registry of its own (not the process-global one), so that
two apps in one process (the tests, the benchmark) never share or clash over counters.

    ftcli_requests_total{route,status}       every answered request
    ftcli_request_errors_total{route,status} those answered 4xx or 5xx
    ftcli_request_seconds{route}             latency, from the request's arrival to its answer
    ftcli_batch_size                         inputs (windows, for long_text: window) per forward pass
    ftcli_queue_inputs                       inputs waiting for a forward pass

With --workers N, each process keeps its values in a folder they share (prometheus-client's
multiprocess mode: PROMETHEUS_MULTIPROC_DIR, set before prometheus_client is imported), and /metrics
adds up every process's, whichever process answers the scrape: counters and histograms summed over
every process that ever served (a worker that died still answered its requests), the queue summed
over the live ones.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SHARED_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # where prometheus-client's multiprocess mode keeps values


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int, shared_dir: str | None = None) -> None:
        """shared_dir: the --workers processes' folder of values (SHARED_DIR_ENV), None for one process."""
        self.registry, self.shared_dir = CollectorRegistry(), shared_dir
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
        self.queue = Gauge(
            "ftcli_queue_inputs", "Inputs waiting for a forward pass.", registry=self.registry, multiprocess_mode="livesum"
        )

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        if self.shared_dir is None:
            return generate_latest(self.registry)
        _forget_dead_processes(self.shared_dir)
        every_process = CollectorRegistry()
        MultiProcessCollector(every_process, self.shared_dir)
        return generate_latest(every_process)


def _forget_dead_processes(folder: str) -> None:
    """Drop the queue of a worker that died (uvicorn starts another in its place): its inputs no
    longer wait. Its counters stay: it answered those requests."""
    for values in Path(folder).glob("gauge_live*_*.db"):
        pid = int(values.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):  # gone, or its pid reused by another user's process
            mark_process_dead(pid, folder)
