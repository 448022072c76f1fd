"""Prometheus collectors and Triton-style per-model statistics.

Collectors live in a registry of the app's own (not prometheus-client's global one), so
several apps in one process (tests) do not collide and /metrics shows only this app.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.batcher import BatchRecord

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
        )
        self.model_ready = Gauge(
            "normserve_model_ready",
            "1 when the model is loaded and warmed up.",
            ["model"],
            registry=self.registry,
        )
        self.stats: dict[str, ModelStats] = {}
        # Batches finish on the event loop, stats are read there too; the lock keeps a
        # snapshot consistent if a reader ever runs in a thread.
        self._lock = threading.Lock()

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
