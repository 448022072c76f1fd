"""Triton's perf_analyzer, unmodified, against a real server: it runs to completion over
HTTP with the binary extension and with JSON, and its server-side breakdown (read from our
statistics extension) adds up.

perf_analyzer aborts when compute_input, compute_infer and compute_output counts differ, so
completion alone checks the statistics' shape; the asserts check their values. Skipped, with
the reason, where the 2.41.1 wheel or its libraries cannot be had (benchmarks.perf_analyzer).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import RunningServer, running_server
from tiny_onnx import tiny_repository, triton_examples_repository

from benchmarks.perf_analyzer import PerfResult, perf_analyzer_available, run_perf_analyzer

pytestmark = pytest.mark.slow
CONCURRENCY = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    reason = perf_analyzer_available()
    if reason is not None:
        pytest.skip(f"perf_analyzer cannot be had: {reason}")
    root = tmp_path_factory.mktemp("perf")
    tiny_repository(root)  # both install into root/repository
    with running_server(triton_examples_repository(root), root) as running:
        yield running


def stats(server: RunningServer, model: str = "tiny") -> dict[str, Any]:
    entry: dict[str, Any] = httpx.get(f"{server.http_url}/v2/models/{model}/stats").json()[
        "model_stats"
    ][0]
    return entry


@pytest.mark.parametrize("fmt", ["binary", "json"])
def test_perf_analyzer_completes_with_a_sane_server_breakdown(
    server: RunningServer, fmt: str, tmp_path: Path
) -> None:
    before = stats(server)
    result: PerfResult = run_perf_analyzer(
        server.url,
        "tiny",
        concurrency=CONCURRENCY,
        input_format=fmt,  # type: ignore[arg-type]
        request_count=200,
        stability_percent=1000,  # any 3 windows: stability is the VM's, not the service's
        max_trials=5,
        workdir=tmp_path,
    )
    after = stats(server)
    s = result.server
    assert result.requests > 0 and result.throughput_per_s > 0
    # One row per request (-b 1): inferences equal requests, up to the requests in flight
    # when a snapshot was taken (a row counts when its batch ends, a success when answered).
    assert s.success_count > 0 and abs(s.inference_count - s.success_count) <= CONCURRENCY
    assert 0 < s.execution_count <= s.inference_count
    # Every phase measured, and the parts are within the whole (µs, rounded by perf_analyzer).
    assert s.compute_input_us > 0 and s.compute_infer_us > 0 and s.compute_output_us > 0
    parts = s.queue_us + s.compute_input_us + s.compute_infer_us + s.compute_output_us
    assert parts <= s.request_us + 4
    assert s.overhead_us >= 0
    # What it read is what we serve: every phase counts each request that ran.
    phases = after["inference_stats"]
    ran = phases["success"]["count"] - before["inference_stats"]["success"]["count"]
    assert ran >= s.success_count
    counts = {phases[p]["count"] for p in ("compute_input", "compute_infer", "compute_output")}
    assert counts == {phases["success"]["count"]}
    assert after["last_inference"] >= max(1, before["last_inference"])


def test_perf_analyzer_drives_a_string_model(server: RunningServer, tmp_path: Path) -> None:
    """BYTES inputs as perf_analyzer makes them (every element the text "7"), binary form."""
    result = run_perf_analyzer(
        server.url,
        "simple_string",
        concurrency=2,
        request_count=100,
        stability_percent=1000,
        max_trials=5,
        workdir=tmp_path,
        extra_args=("--string-data", "7"),
    )
    assert result.server.success_count > 0 and result.server.compute_infer_us > 0
    phases = stats(server, "simple_string")["inference_stats"]
    assert phases["fail"]["count"] == 0 and phases["compute_infer"]["count"] > 0
