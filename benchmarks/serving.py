"""Our service as the HTTP benchmark runs it: a repository of the benchmark models, the
request bodies of each wire format, and a server process with its cold start measured.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from benchmarks.models import Exported
from benchmarks.procs import free_port
from export.publish import publish

ROOT = Path(__file__).resolve().parents[1]
READY_WITHIN_S = 120.0


@dataclass(frozen=True)
class Body:
    """One request as it goes over the wire, for wrk and for the first-inference check."""

    format: str  # "v2-json" | "v2-binary" | "v1-json"
    path: str  # "/v2/models/<m>/infer" or "/v1/models/<m>:predict"
    content: bytes
    content_type: str
    headers: dict[str, str]
    # Bodies sent in turn instead of ``content`` when given (a variable-length model's mixed
    # shapes); ``content`` is then the first of them, for the first-inference check.
    contents: tuple[bytes, ...] = ()


def bodies(
    model: str, sample: np.ndarray, input_name: str = "input", output_name: str = "logits"
) -> dict[str, Body]:
    """The same one-sample request in each wire format the service speaks."""
    x = np.ascontiguousarray(sample[None], dtype=np.float32)
    infer = f"/v2/models/{model}/infer"
    tensor = {"name": input_name, "datatype": "FP32", "shape": list(x.shape)}
    v2_json = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
    # The binary extension as tritonclient sends it: raw input bytes, binary output asked for.
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
        }
    ).encode()
    v1_json = json.dumps({"instances": x.tolist()}).encode()
    return {
        "v2-json": Body("v2-json", infer, v2_json, "application/json", {}),
        "v2-binary": Body(
            "v2-binary",
            infer,
            header + x.tobytes(),
            "application/octet-stream",
            {"Inference-Header-Content-Length": str(len(header))},
        ),
        "v1-json": Body("v1-json", f"/v1/models/{model}:predict", v1_json, "application/json", {}),
    }


def bench_repository(models: list[Exported], root: Path) -> Path:
    """A model repository holding each benchmark model's folded ONNX file, as published by
    the export tool (batches up to 128, so in-process and served batches compare)."""
    for exported in models:
        publish(
            root,
            exported.spec.name,
            exported.report,
            description=exported.spec.description,
            version=1,
            max_batch_size=128,
            replace=True,
        )
    return root


@dataclass(frozen=True)
class Server:
    name: str
    url: str  # http://127.0.0.1:PORT
    pid: int
    cold_start_s: float  # process start to the first successful inference
    grpc_url: str  # 127.0.0.1:PORT of its gRPC API (perf_analyzer -i grpc loads it)


def first_inference_s(
    url: str, body: Body, started: float, proc: subprocess.Popen[bytes], log: Path
) -> float:
    """Seconds from ``started`` until ``body`` is answered 200, polling without pause."""
    deadline = started + READY_WITHIN_S
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log)}")
            try:
                response = client.post(
                    url + body.path,
                    content=body.content,
                    headers={"Content-Type": body.content_type, **body.headers},
                )
                if response.status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.005)
    raise RuntimeError(f"no successful inference within {READY_WITHIN_S:.0f} s:\n{_tail(log)}")


@contextmanager
def running_normserve(
    name: str,
    repository: Path,
    probe: Body,
    log_dir: Path,
    settings: Mapping[str, str] | None = None,
) -> Iterator[Server]:
    """``python -m service`` on a free loopback port with NORMSERVE_* ``settings``."""
    port, grpc_port = free_port(), free_port()
    log = log_dir / f"{name}.log"
    env = {
        # The caller's NORMSERVE_* variables would change what is measured unseen: every
        # server here runs the defaults but for ``settings``.
        **{k: v for k, v in os.environ.items() if not k.startswith("NORMSERVE_")},
        "PYTHONPATH": str(ROOT),
        "NORMSERVE_ACCESS_LOG": "false",  # a log line per request would be measured too
        "NORMSERVE_LOG_LEVEL": "warning",
        # A port of its own: servers side by side on one (SO_REUSEPORT) would share the load.
        "NORMSERVE_GRPC_PORT": str(grpc_port),
        **(settings or {}),
    }
    command = [sys.executable, "-m", "service", "--repository", str(repository),
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with log.open("wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        cold = first_inference_s(url, probe, started, proc, log)
        yield Server(name, url, proc.pid, cold, f"127.0.0.1:{env['NORMSERVE_GRPC_PORT']}")
    finally:
        if proc.poll() is None:  # only the process started here, by its PID
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
