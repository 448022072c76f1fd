"""SIGTERM turns readiness to 503 before the listener closes (service.front.drain).

A real ``python -m service`` process with ``--drain-delay-s``: after SIGTERM, ``/v2/health/ready``
answers 503 while ``/v2/health/live`` and inference still answer 200 on the same port; then
the server exits 0. A second SIGTERM during the pause stops the server at once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from servers import running_server
from tiny_onnx import FEATURES, tiny_repository

DELAY_S = 4.0


def infer(base: str) -> httpx.Response:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, FEATURES],
                        "data": [0.5] * FEATURES}]}  # fmt: skip
    return httpx.post(f"{base}/v2/models/tiny/infer", json=body, timeout=5)


def ready_status(base: str) -> int:
    return httpx.get(f"{base}/v2/health/ready", timeout=5).status_code


def wait_not_ready(base: str) -> float:
    """Seconds until readiness answered 503 (the signal is handled between event-loop ticks)."""
    started = time.monotonic()
    while ready_status(base) == 200:
        assert time.monotonic() - started < DELAY_S, "still ready long after SIGTERM"
        time.sleep(0.02)
    return time.monotonic() - started


def test_sigterm_makes_readiness_503_while_requests_are_still_served(tmp_path: Path) -> None:
    repository = tiny_repository(tmp_path)
    with running_server(repository, tmp_path, "--drain-delay-s", str(DELAY_S)) as server:
        base = server.http_url
        assert ready_status(base) == 200
        signalled = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        wait_not_ready(base)
        # Still serving on the open listener: new connections, inference and liveness.
        assert infer(base).status_code == 200
        assert httpx.get(f"{base}/v2/health/live", timeout=5).status_code == 200
        answer = httpx.get(f"{base}/v2/health/ready", timeout=5)
        assert (answer.status_code, answer.json()) == (503, {"ready": False})
        assert time.monotonic() - signalled < DELAY_S, "the checks above outlasted the pause"
        code = server.proc.wait(timeout=DELAY_S + 15)
        closed_after = time.monotonic() - signalled
        # running_server's own exit check follows; the listener stayed open for the pause.
        assert code == 0, server.log_tail()
        assert closed_after >= DELAY_S, closed_after
        with pytest.raises(httpx.ConnectError):
            ready_status(base)
    assert "not ready, closing the listener in 4.0 s" in server.log_tail()


def test_a_second_sigterm_during_the_pause_stops_at_once(tmp_path: Path) -> None:
    repository = tiny_repository(tmp_path)
    long_delay = 60
    with running_server(repository, tmp_path, "--drain-delay-s", str(long_delay)) as server:
        os.kill(server.proc.pid, signal.SIGTERM)
        wait_not_ready(server.http_url)
        signalled = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        assert server.proc.wait(timeout=15) == 0, server.log_tail()
        assert time.monotonic() - signalled < long_delay
