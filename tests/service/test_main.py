"""``python -m service`` as a process: settings refused before it binds, flags over
variables, one JSON access-log line per request (tests/review item 4; tests/service/test_logs.py
for the log formats)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest
from servers import ROOT, running_server
from tiny_onnx import FEATURES, tiny_repository

from service.settings import cpu_budget


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--max-queue-size", "0"], {}, "max_queue_size"),
        (["--port", "70000"], {}, "port"),
        ([], {"NORMSERVE_MAX_HEADER_BYTES": "lots"}, "max_header_bytes"),
        (["--workers", "999"], {}, "workers"),
    ],
)
def test_invalid_settings_stop_the_server_before_it_binds(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    result = _run("--repository", str(tiny_repository(tmp_path)), *args, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and named in result.stderr
    assert "Traceback" not in result.stderr and "Uvicorn running" not in result.stderr


def test_a_missing_repository_is_one_error_line(tmp_path: Path) -> None:
    result = _run("--repository", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr


def test_flags_beat_variables_and_the_access_log_is_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The variable would make the server listen on port 1 and log no access lines: the
    # flags running_server passes (--port) and this one (--access-log) must win.
    monkeypatch.setenv("NORMSERVE_PORT", "1")
    monkeypatch.setenv("NORMSERVE_ACCESS_LOG", "false")
    monkeypatch.setenv("NORMSERVE_LOG_FORMAT", "json")
    with running_server(tiny_repository(tmp_path), tmp_path, "--access-log", "true") as server:
        response = httpx.get(f"{server.http_url}/v2", headers={"x-request-id": "probe-7"})
        assert response.headers["x-request-id"] == "probe-7"
    lines = [line for line in server.log_path.read_text().splitlines() if "probe-7" in line]
    assert len(lines) == 1, lines
    entry = json.loads(lines[0])  # the whole line (service.operations.logs)
    assert entry["request_id"] == "probe-7" and entry["status"] == 200
    assert entry["method"] == "GET" and entry["path"] == "/v2" and entry["ms"] >= 0


@pytest.mark.skipif(cpu_budget() < 2, reason="two workers need two CPUs here")
def test_forked_workers_count_every_request_in_the_private_metrics_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no PROMETHEUS_MULTIPROC_DIR given, python -m service makes one before its workers
    start; prometheus-client reads it at import, and the workers are forked with it imported,
    so it must be set before anything imports the metrics (service.operations)."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    requests = 8
    body = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, FEATURES], "data": [1.0] * FEATURES}
            ]
        }
    )
    with running_server(tiny_repository(tmp_path), tmp_path, "--workers", "2") as server:
        for _ in range(requests):  # a new connection each: the workers share them out
            response = httpx.post(f"{server.http_url}/v2/models/tiny/infer", content=body)
            assert response.status_code == 200, response.text
        line = 'normserve_requests_total{model="tiny",protocol="v2",status="200"}'
        text = httpx.get(f"{server.http_url}/metrics").text
        counts = [float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)]
        assert counts == [requests], text[-2000:]
