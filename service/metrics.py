"""Prometheus collectors and Triton-style per-model statistics.

Collectors live in a registry of the app's own (not prometheus-client's global one), so
several apps in one process (tests) do not collide and /metrics shows only this app.

With several worker processes (``--workers N``) a scrape reaches one of them at random, so
each would show only its own share and counters would jump between scrapes. Then
``python -m service`` sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start:
prometheus-client keeps every value in a file per process there, and ``exposition()``
sums them, so every scrape shows the whole server.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess

from service.batcher import BatchRecord

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass
class ModelStats:
    """Counters behind Triton's ``GET /v2/models/stats`` (durations in nanoseconds)."""

    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # batches run
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    last_inference_ms: int = 0
    batch_sizes: dict[int, list[int]] = field(default_factory=dict)  # rows -> [count, ns]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "normserve_requests",
            "Inference requests by model, protocol and HTTP status.",
            ["model", "protocol", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "normserve_request_duration_seconds",
            "Inference request latency, from body received to response ready.",
            ["model", "protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "normserve_queue_duration_seconds",
            "Time a request waited for its batch to start.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "normserve_compute_duration_seconds",
            "onnxruntime time per batch.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "normserve_batch_size",
            "Rows per executed batch.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "normserve_queue_depth",
            "Requests waiting for a batch.",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",  # all workers' queues together
        )
        self.model_ready = Gauge(
            "normserve_model_ready",
            "1 when the model is loaded and warmed up.",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livemin",  # ready only when every worker has it loaded
        )
        self.stats: dict[str, ModelStats] = {}
        # Batches finish on the event loop, stats are read there too; the lock keeps a
        # snapshot consistent if a reader ever runs in a thread.
        self._lock = threading.Lock()

    @staticmethod
    def multiprocess() -> bool:
        return bool(os.environ.get(MULTIPROC_ENV))

    def exposition(self) -> bytes:
        """The text format for /metrics: this process's, or every worker's summed."""
        if not self.multiprocess():
            return bytes(generate_latest(self.registry))
        combined = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
        return bytes(generate_latest(combined))

    def close(self) -> None:
        """At a worker's shutdown: its live gauges (queue depth, readiness) stop counting."""
        if self.multiprocess():
            prometheus_multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    def on_batch(self, record: BatchRecord) -> None:
        model = record.model
        self.batch_size.labels(model).observe(record.rows)
        self.compute_seconds.labels(model).observe(record.compute_seconds)
        for seconds in record.queue_seconds:
            self.queue_seconds.labels(model).observe(seconds)
        with self._lock:
            stats = self.stats.setdefault(model, ModelStats())
            compute_ns = int(record.compute_seconds * 1e9)
            stats.compute_ns += compute_ns
            stats.queue_ns += int(sum(record.queue_seconds) * 1e9)
            if not record.failed:
                stats.execution_count += 1
                stats.inference_count += record.rows
                entry = stats.batch_sizes.setdefault(record.rows, [0, 0])
                entry[0] += 1
                entry[1] += compute_ns
                stats.last_inference_ms = int(time.time() * 1000)

    def on_request(
        self, model: str, protocol: str, status: int, seconds: float, counted: bool
    ) -> None:
        """One finished request; ``counted`` when it reached the model (success or failure)."""
        self.requests.labels(model, protocol, str(status)).inc()
        self.request_seconds.labels(model, protocol).observe(seconds)
        if not counted:
            return
        with self._lock:
            stats = self.stats.setdefault(model, ModelStats())
            if status == 200:
                stats.success_count += 1
                stats.success_ns += int(seconds * 1e9)
            else:
                stats.fail_count += 1
                stats.fail_ns += int(seconds * 1e9)
