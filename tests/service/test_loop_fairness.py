"""Overload and large bodies cannot starve the other clients.

A request for a model whose queue is full is refused (503 + Retry-After) before its body is
read; large bodies are decoded in a child process (service.front.decoding), so that
everyone else's health checks keep being answered.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from servers import ROOT, RunningServer, free_port, running_server, wait_until_ready
from starlette.testclient import TestClient
from tiny_onnx import FEATURES, tiny_repository

from service.app import create_app
from service.front.decoding import OFF_LOOP_BYTES
from service.settings import Settings

# Health-check delay allowed while four ~8 MB bodies are decoded. The goal is 50 ms (53 ms
# measured here with other work on the machine); decoded on the event loop they delayed
# it by 323 ms, in worker threads by up to 210 ms. Three times the goal, for a busy CI.
STALL_BOUND_MS = float(os.environ.get("NORMSERVE_TEST_STALL_BOUND_MS", "150"))


def _scope(path: str) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"content-length", b"2")],
        "client": ("127.0.0.1", 1), "server": ("testserver", 80),
    }  # fmt: skip


def test_a_full_queue_is_refused_before_the_body_is_read(tmp_path: Path) -> None:
    repository = tiny_repository(tmp_path)
    app = create_app(Settings(repository=repository, max_queue_size=2, access_log=False))
    calls = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    async def scenario() -> None:
        served = app.store.served["tiny"]
        x = {"x": np.zeros((1, FEATURES), np.float32)}
        # No await between these and the request: the batcher cannot take them meanwhile.
        queued = [app.protocol.submit(served, x, None) for _ in range(2)]
        await app(_scope("/v2/models/tiny/infer"), receive, send)
        for future in queued:  # the queued work still completes
            assert (await future)["scores"].shape == (1, 3)

    with TestClient(app) as client:
        client.portal.call(scenario)
    assert calls == 0, "the body was read for a request that was refused anyway"
    start, body = sent
    assert start["status"] == 503
    headers = dict(start["headers"])
    assert headers[b"retry-after"] == b"1"
    assert b"overloaded" in body["body"]


def _big_bodies() -> list[bytes]:
    rows = np.random.default_rng(0).random((9_000, 100)).round(6).tolist()
    # Wrong dims: refused once parsed, before conversion. Right dims, far too much data:
    # refused after flattening. Both well above OFF_LOOP_BYTES.
    wrong_dims = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [9_000, 100], "data": rows}]
    }
    too_much = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [8, FEATURES], "data": rows}]}
    bodies = [orjson.dumps(wrong_dims), orjson.dumps(too_much)] * 2
    assert all(len(body) > 5 * OFF_LOOP_BYTES for body in bodies)
    return bodies


def test_large_bodies_do_not_stall_other_clients(tmp_path: Path) -> None:
    repository = tiny_repository(tmp_path)
    bodies = _big_bodies()
    with running_server(repository, tmp_path, "--max-batch-size", "8") as server:
        statuses: list[int] = []

        def post(body: bytes) -> None:
            with httpx.Client(base_url=server.http_url, timeout=60) as client:
                statuses.append(client.post("/v2/models/tiny/infer", content=body).status_code)

        latencies: list[float] = []
        with httpx.Client(base_url=server.http_url, timeout=10) as health:
            health.get("/v2/health/ready")  # the connection is open before the bodies come
            senders = [threading.Thread(target=post, args=(b,)) for b in bodies]
            for sender in senders:
                sender.start()
            while any(sender.is_alive() for sender in senders):
                started = time.perf_counter()
                assert health.get("/v2/health/ready").status_code == 200
                latencies.append((time.perf_counter() - started) * 1000)
            for sender in senders:
                sender.join()
    assert statuses == [400] * 4
    assert len(latencies) > 10, "the big requests ended before anything was measured"
    worst = max(latencies)
    assert worst < STALL_BOUND_MS, (
        f"health check delayed {worst:.0f} ms (p50 {np.median(latencies):.1f})"
    )


def _children(pid: int) -> set[int]:
    tasks = Path(f"/proc/{pid}/task")
    found: set[int] = set()
    for task in tasks.iterdir() if tasks.exists() else []:
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _serve(repository: Path, log: Path) -> RunningServer:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--repository", str(repository), "--port", str(port)],
        cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    server = RunningServer(f"127.0.0.1:{port}", f"http://127.0.0.1:{port}", log, proc)
    wait_until_ready(server)
    return server


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_the_decoding_process_ends_with_the_server(tmp_path: Path, signal_name: str) -> None:
    """Started by the first large body; gone when the server stops, even by SIGKILL (the
    OOM killer's way), so that no decoder outlives its server."""
    server = _serve(tiny_repository(tmp_path), tmp_path / "server.log")
    try:
        before = _children(server.proc.pid)
        response = httpx.post(f"{server.http_url}/v2/models/tiny/infer", content=_big_bodies()[0])
        assert response.status_code == 400
        spawned = _children(server.proc.pid) - before
        assert spawned, "no decoding process was started for a large body"
        server.proc.send_signal(getattr(signal, signal_name))
        server.proc.wait(30)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in spawned) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in spawned), f"the decoder outlived {signal_name}"
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


def test_requests_refused_after_admission_give_their_place_back(tmp_path: Path) -> None:
    """An admitted request holds a place in its model's queue while its body is read; every
    way it can fail before it is queued (bad JSON, wrong shape, too large) gives the place
    back, so bad requests can never leave the queue full."""
    repository = tiny_repository(tmp_path)
    app = create_app(Settings(repository=repository, max_queue_size=2, access_log=False))
    good = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, FEATURES], "data": [1] * 4}]}
    )
    bad = [b"{not json", good.replace(b"[1,4]", b"[2,4]"), b"[" * 100_000]
    with TestClient(app) as client:
        for body in bad * 3:  # more failures than places
            answer = client.post("/v2/models/tiny/infer", content=body)
            assert answer.status_code in (400, 413), answer.text
        assert app.store.served["tiny"].batcher._reserved == 0
        assert client.post("/v2/models/tiny/infer", content=good).status_code == 200
