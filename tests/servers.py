"""Real ``python -m service`` processes for end-to-end tests.

The server is started once per session on a free port, polled until ``/v2/health/ready``
answers 200 (at most 60 s), and stopped with SIGTERM at the end: the fixture then asserts
that the process shut down gracefully, with exit code 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]  # tests/servers.py -> the project root
READY_WITHIN_S = 60.0
EXIT_WITHIN_S = 30.0


@dataclass(frozen=True)
class RunningServer:
    url: str  # "127.0.0.1:PORT", what tritonclient takes
    http_url: str  # "http://127.0.0.1:PORT", what httpx takes
    log_path: Path
    proc: subprocess.Popen[bytes]
    grpc_url: str = ""  # "127.0.0.1:PORT" of the gRPC API when started with grpc=True

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(log unreadable: {exc})"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_ready(server: RunningServer, endpoint: str = "/v2/health/ready") -> None:
    deadline = time.monotonic() + READY_WITHIN_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(
                f"server exited with {server.proc.returncode} before it was ready:\n"
                f"{server.log_tail()}"
            )
        try:
            response = httpx.get(f"{server.http_url}{endpoint}", timeout=2.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    pytest.fail(f"server not ready within {READY_WITHIN_S:.0f} s ({last}):\n{server.log_tail()}")


@contextmanager
def running_server(
    repository: Path, log_dir: Path, *args: str, until: str = "ready", grpc: bool = False
) -> Iterator[RunningServer]:
    """``python -m service`` on a free port with extra ``args``; stopped by SIGTERM after.

    Waits until ``/v2/health/<until>`` answers 200: "live" for a server with a broken model,
    which is live and never ready. ``grpc``: the gRPC API on a free port of its own too (it
    listens before HTTP answers); otherwise it is off (tests/conftest.py).
    """
    port = free_port()
    grpc_port = free_port() if grpc else 0
    log_path = log_dir / f"server-{port}.log"
    command = [
        sys.executable, "-m", "service", "--repository", str(repository),
        "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port), *args,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    running = RunningServer(
        f"127.0.0.1:{port}",
        f"http://127.0.0.1:{port}",
        log_path,
        proc,
        f"127.0.0.1:{grpc_port}" if grpc else "",
    )
    try:
        wait_until_ready(running, f"/v2/health/{until}")
        yield running
    finally:
        # Only ever the process started above, by its own PID.
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            pytest.fail(
                f"server did not exit within {EXIT_WITHIN_S:.0f} s of SIGTERM:\n"
                f"{running.log_tail()}"
            )
    assert code == 0, (
        f"server did not exit cleanly after SIGTERM: exit code {code}\n{running.log_tail()}"
    )
