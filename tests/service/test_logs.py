"""``--log-format json|text`` on a real server (issue 18, point 2).

In json every line the process writes, uvicorn's start-up and shutdown lines included, must
parse as one JSON object with time, level, logger and message; the access log's fields are
top-level fields; an inference error carries its traceback as a field; in multi-worker mode
the workers' lines too. text stays lines for people.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from faulty_onnx import BAD_INDEX, faulty_repository
from servers import RunningServer, running_server
from tiny_onnx import tiny_repository

from service.settings import cpu_budget


def _repository(root: Path) -> Path:
    tiny_repository(root)
    return faulty_repository(root)


def _exercise(server: RunningServer) -> None:
    """A 200, a 404 and a 400, and an inference that fails inside onnxruntime (500)."""
    url = server.http_url
    assert httpx.get(f"{url}/v2", headers={"x-request-id": "ok-1"}).status_code == 200
    assert httpx.get(f"{url}/v2/nowhere", headers={"x-request-id": "missing-2"}).status_code == 404
    bad_body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["x"]}]}
    response = httpx.post(
        f"{url}/v2/models/faulty/infer", json=bad_body, headers={"x-request-id": "bad-3"}
    )
    assert response.status_code == 400
    failing = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [BAD_INDEX]}]}
    response = httpx.post(
        f"{url}/v2/models/faulty/infer", json=failing, headers={"x-request-id": "fails-4"}
    )
    assert response.status_code == 500


def _json_lines(log: Path) -> list[dict[str, Any]]:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}\nin:\n{log.read_text()[-3000:]}")
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
        assert datetime.fromisoformat(entry["time"]).utcoffset().total_seconds() == 0
        entries.append(entry)
    return entries


def _by_request(entries: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("request_id") == request_id]


def test_json_every_line_is_one_object(tmp_path: Path) -> None:
    with running_server(_repository(tmp_path), tmp_path, "--log-format", "json") as server:
        _exercise(server)
    entries = _json_lines(server.log_path)
    loggers = {e["logger"] for e in entries}
    # uvicorn's own lines (start-up, shutdown) went through the same formatter.
    assert "uvicorn.error" in loggers and "normserve" in loggers, loggers
    assert any("Uvicorn running" in e["message"] for e in entries)

    (ok,) = [e for e in _by_request(entries, "ok-1") if e["logger"] == "normserve.access"]
    assert ok["method"] == "GET" and ok["path"] == "/v2" and ok["status"] == 200
    assert ok["ms"] >= 0 and ok["client"] == "127.0.0.1" and ok["level"] == "INFO"
    (missing,) = _by_request(entries, "missing-2")
    assert missing["status"] == 404
    (bad,) = _by_request(entries, "bad-3")
    assert bad["status"] == 400 and bad["path"] == "/v2/models/faulty/infer"
    # The inference error, logged once, by the batcher (which serves no one request), its
    # traceback a field, not lines of its own; the request's own line is its access line.
    failed = [e for e in entries if "traceback" in e]
    assert [e["logger"] for e in failed] == ["normserve.batcher"], failed
    assert failed[0]["level"] == "ERROR"
    assert "Traceback (most recent call last)" in failed[0]["traceback"]
    assert "out of data bounds" in failed[0]["traceback"]
    access = [e for e in _by_request(entries, "fails-4") if e["logger"] == "normserve.access"]
    assert [e["status"] for e in access] == [500]


@pytest.mark.skipif(cpu_budget() < 2, reason="two workers need two CPUs here")
def test_json_in_multi_worker_mode(tmp_path: Path) -> None:
    with running_server(
        tiny_repository(tmp_path), tmp_path, "--log-format", "json", "--workers", "2"
    ) as server:
        assert httpx.get(f"{server.http_url}/v2", headers={"x-request-id": "w-1"}).is_success
    entries = _json_lines(server.log_path)
    # The parent's lines and both workers' (each logs its start-up) are all JSON.
    assert sum("Started server process" in e["message"] for e in entries) == 2, entries
    assert any("Started parent process" in e["message"] for e in entries)
    (access,) = _by_request(entries, "w-1")
    assert access["status"] == 200


def test_text_stays_readable(tmp_path: Path) -> None:
    with running_server(tiny_repository(tmp_path), tmp_path, "--log-format", "text") as server:
        assert httpx.get(f"{server.http_url}/v2", headers={"x-request-id": "people-7"}).is_success
    lines = server.log_path.read_text().splitlines()
    (access,) = [line for line in lines if "people-7" in line]
    assert " INFO normserve.access GET /v2 200 " in access and access.endswith("[people-7]")
    assert not any(line.lstrip().startswith("{") for line in lines)


def test_refused_settings_in_json(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from servers import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "service", "--repository", str(tiny_repository(tmp_path)),
         "--log-format", "json", "--port", "70000"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and "port" in entry["message"]


class _Writes:
    """A stream that remembers each write."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


def test_lines_of_one_loop_iteration_leave_in_one_write_and_in_order() -> None:
    import asyncio
    import logging

    from service.operations.logs import LineBatchingHandler, TextFormatter

    stream = _Writes()
    handler = LineBatchingHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("normserve.test.batching")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    async def scenario() -> list[str]:
        logger.info("first")
        logger.info("second")
        assert stream.writes == []  # kept until the loop's next iteration
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return list(stream.writes)

    try:
        writes = asyncio.run(scenario())
        assert len(writes) == 1
        assert writes[0].index("first") < writes[0].index("second")
        assert writes[0].count("\n") == 2
        logger.info("outside any loop")  # written at once: nothing runs a loop to flush it
        assert len(stream.writes) == 2 and "outside any loop" in stream.writes[1]
    finally:
        logger.removeHandler(handler)
