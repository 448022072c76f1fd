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
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from service.operations import MULTIPROC_ENV
from service.serving.batcher import BatchRecord

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ModelStats:
    """Counters behind Triton's ``GET /v2/models/stats`` (durations in nanoseconds).

    As Triton counts them: ``compute_*`` once per request whose batch ran, each request
    charged its whole batch's time (a batch of 8 adds 8 counts and 8x its infer time), so
    the three counts are equal (perf_analyzer aborts otherwise) and, with ``queue``, add up
    to at most each request's own duration. ``batch_sizes`` holds each batch once.
    """

    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # batches run
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_count: int = 0  # requests whose batch ran without error
    compute_input_ns: int = 0  # decode, validate and queue the request, merge its batch
    compute_infer_ns: int = 0  # its batch's onnxruntime time
    compute_output_ns: int = 0  # split its batch, encode the response
    last_inference_ms: int = 0
    # rows -> [count, infer ns, input ns, output ns]
    batch_sizes: dict[int, list[int]] = field(default_factory=dict)


# One request's collectors, already labelled: requests, latency, outcome count and seconds.
_Children = tuple[Counter, Histogram, Counter | None, Counter | None]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "normserve_requests",
            "Inference requests by model, protocol (v2, v1, grpc) and status (HTTP code or gRPC "
            "code name).",
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
            ["model", "version"],
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
        # Triton's statistics extension, kept in collectors too, so that with several
        # workers /v2/models/stats sums every process exactly as /metrics does (a dict per
        # process would answer with whichever worker the request reached).
        self.outcomes = Counter(
            "normserve_model_requests",
            "Requests that reached a served model, by outcome (success|fail).",
            ["model", "version", "outcome"],
            registry=self.registry,
        )
        self.outcome_seconds = Counter(
            "normserve_model_request_seconds",
            "Total duration of the requests that reached a served model, by outcome.",
            ["model", "version", "outcome"],
            registry=self.registry,
        )
        self.executions = Counter(
            "normserve_executions",
            "Batches that ran without error, by rows in the batch.",
            ["model", "version", "batch_size"],
            registry=self.registry,
        )
        self.execution_seconds = Counter(
            "normserve_execution_seconds",
            "onnxruntime time of the batches that ran without error, by rows in the batch.",
            ["model", "version", "batch_size"],
            registry=self.registry,
        )
        # Triton's compute_input and compute_output (perf_analyzer requires their counts to
        # equal compute_infer's): merging the requests' rows, handing each its rows back.
        self.execution_input_seconds = Counter(
            "normserve_execution_input_seconds",
            "Time merging requests into the batches that ran without error, by rows.",
            ["model", "version", "batch_size"],
            registry=self.registry,
        )
        self.execution_output_seconds = Counter(
            "normserve_execution_output_seconds",
            "Time handing each request its rows of the batches that ran without error, by rows.",
            ["model", "version", "batch_size"],
            registry=self.registry,
        )
        # Triton's per-request compute statistics: every request of a batch that ran is
        # charged the batch's time, plus its own decoding (input) and encoding (output).
        self.compute_requests = Counter(
            "normserve_model_compute_requests",
            "Requests whose batch ran without error (Triton's compute counts).",
            ["model", "version"],
            registry=self.registry,
        )
        self.compute_request_seconds = Counter(
            "normserve_model_compute_request_seconds",
            "Per request, summed: input = decode + validate + merge its batch, infer = its "
            "batch's onnxruntime time, output = split its batch + encode the response.",
            ["model", "version", "phase"],
            registry=self.registry,
        )
        self.last_inference = Gauge(
            "normserve_last_inference_timestamp_seconds",
            "When the model last finished a batch (Unix time).",
            ["model", "version"],
            registry=self.registry,
            multiprocess_mode="max",  # the latest of any worker
        )
        # Labelled children, looked up once per label combination (see _children).
        self._request_children: dict[tuple[str, str, int | str, bool, str], _Children] = {}
        self._batch_children: dict[
            tuple[str, str], tuple[Histogram, Histogram, Histogram, Gauge]
        ] = {}
        self._compute_children: dict[
            tuple[str, str], tuple[Counter, Counter, Counter, Counter]
        ] = {}
        self._execution_children: dict[
            tuple[str, str, int], tuple[Counter, Counter, Counter, Counter]
        ] = {}

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

    def set_model_ready(self, model: str, ready: bool) -> None:
        self.model_ready.labels(model).set(1 if ready else 0)

    def on_batch(self, record: BatchRecord) -> None:
        model, version, rows = record.model, record.version, record.rows
        children = self._batch_children.get((model, version))
        if children is None:
            children = self._batch_children[(model, version)] = (
                self.batch_size.labels(model),
                self.compute_seconds.labels(model),
                self.queue_seconds.labels(model, version),
                self.last_inference.labels(model, version),
            )
        batch_size, compute, queue, last_inference = children
        batch_size.observe(rows)
        compute.observe(record.compute_seconds)
        for seconds in record.queue_seconds:
            queue.observe(seconds)
        if not record.failed:
            executions = self._execution_children.get((model, version, rows))
            if executions is None:
                executions = self._execution_children[(model, version, rows)] = (
                    self.executions.labels(model, version, str(rows)),
                    self.execution_seconds.labels(model, version, str(rows)),
                    self.execution_input_seconds.labels(model, version, str(rows)),
                    self.execution_output_seconds.labels(model, version, str(rows)),
                )
            count, infer, merge, split = executions
            count.inc()
            infer.inc(record.compute_seconds)
            merge.inc(record.input_seconds)
            split.inc(record.output_seconds)
            requests, c_input, c_infer, c_output = self._compute(model, version)
            n = record.requests
            requests.inc(n)
            c_input.inc(n * record.input_seconds)
            c_infer.inc(n * record.compute_seconds)
            c_output.inc(n * record.output_seconds)
            last_inference.set(time.time())

    def on_codec(
        self, model: str, version: str, decode_seconds: float, encode_seconds: float
    ) -> None:
        """One answered request's own decoding and encoding (Triton's compute_input and
        compute_output beyond its batch's share); only for requests that ran, as counted."""
        _, c_input, _, c_output = self._compute(model, version)
        c_input.inc(decode_seconds)
        c_output.inc(encode_seconds)

    def _compute(self, model: str, version: str) -> tuple[Counter, Counter, Counter, Counter]:
        children = self._compute_children.get((model, version))
        if children is None:
            children = self._compute_children[(model, version)] = (
                self.compute_requests.labels(model, version),
                self.compute_request_seconds.labels(model, version, "input"),
                self.compute_request_seconds.labels(model, version, "infer"),
                self.compute_request_seconds.labels(model, version, "output"),
            )
        return children

    def on_request(
        self,
        model: str,
        protocol: str,
        status: int | str,
        seconds: float,
        counted: bool,
        version: str = "",
    ) -> None:
        """One finished request; ``counted`` when it reached the model (success or failure),
        served by ``version``. ``status`` is the HTTP status, or the gRPC status code's name
        ("OK", ...)."""
        key = (model, protocol, status, counted, version)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = self._children(*key)
        requests, request_seconds, outcomes, outcome_seconds = children
        requests.inc()
        request_seconds.observe(seconds)
        if outcomes is not None and outcome_seconds is not None:
            outcomes.inc()
            outcome_seconds.inc(seconds)

    def _children(
        self, model: str, protocol: str, status: int | str, counted: bool, version: str
    ) -> _Children:
        # labels() takes a lock and builds a key on every call: 4 calls per request were ~3%
        # of the event loop's time under load, so each label combination is looked up once.
        # Label values come only from repository names, protocols and statuses: bounded.
        outcome = "success" if status in (200, "OK") else "fail"
        return (
            self.requests.labels(model, protocol, str(status)),
            self.request_seconds.labels(model, protocol),
            self.outcomes.labels(model, version, outcome) if counted else None,
            self.outcome_seconds.labels(model, version, outcome) if counted else None,
        )

    def model_stats(self) -> dict[tuple[str, str], ModelStats]:
        """Triton statistics per (model, version), from this process's collectors or every
        worker's."""
        stats: dict[tuple[str, str], ModelStats] = {}
        for family in self._collect():
            for sample in family.samples:
                model, version = sample.labels.get("model"), sample.labels.get("version")
                if model is None or version is None:
                    continue
                key = (model, version)
                _add_sample(stats.setdefault(key, ModelStats()), sample.name, sample)
        return stats

    def _collect(self) -> Iterable[Metric]:
        if not self.multiprocess():
            return self.registry.collect()
        combined = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
        return combined.collect()


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def _add_sample(stats: ModelStats, name: str, sample: Sample) -> None:
    """Adds one collected sample to the statistics it belongs to (others are ignored)."""
    labels, value = sample.labels, sample.value
    if name == "normserve_model_requests_total":
        if labels["outcome"] == "success":
            stats.success_count += int(value)
        else:
            stats.fail_count += int(value)
    elif name == "normserve_model_request_seconds_total":
        if labels["outcome"] == "success":
            stats.success_ns += _ns(value)
        else:
            stats.fail_ns += _ns(value)
    elif name == "normserve_queue_duration_seconds_sum":
        stats.queue_ns += _ns(value)
    elif name == "normserve_queue_duration_seconds_count":
        stats.queue_count += int(value)
    elif name == "normserve_model_compute_requests_total":
        stats.compute_count += int(value)
    elif name == "normserve_model_compute_request_seconds_total":
        phase = labels["phase"]
        if phase == "input":
            stats.compute_input_ns += _ns(value)
        elif phase == "infer":
            stats.compute_infer_ns += _ns(value)
        else:
            stats.compute_output_ns += _ns(value)
    elif name == "normserve_executions_total":
        rows, count = int(labels["batch_size"]), int(value)
        stats.execution_count += count
        stats.inference_count += rows * count
        _batch(stats, labels)[0] += count
    elif name == "normserve_execution_seconds_total":
        _batch(stats, labels)[1] += _ns(value)
    elif name == "normserve_execution_input_seconds_total":
        _batch(stats, labels)[2] += _ns(value)
    elif name == "normserve_execution_output_seconds_total":
        _batch(stats, labels)[3] += _ns(value)
    elif name == "normserve_last_inference_timestamp_seconds" and value > 0:
        stats.last_inference_ms = max(stats.last_inference_ms, int(value * 1000))


def _batch(stats: ModelStats, labels: dict[str, str]) -> list[int]:
    return stats.batch_sizes.setdefault(int(labels["batch_size"]), [0, 0, 0, 0])
