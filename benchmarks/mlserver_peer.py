"""Seldon MLServer 1.7.1 as a comparison peer: the same ONNX file, the same onnxruntime settings.

MLServer cannot share the project's virtual environment (its pins clash with ours), so it gets
its own venv, built once by :func:`ensure_mlserver_venv` and reused while the stamp file says
the same packages are in it. The model is served by ``mlserver_runtime/onnx_runtime.py``, a
custom runtime that builds the onnxruntime session exactly as ``service.serving.runtime.OnnxModel``
does, with MLServer's adaptive batching on, so that a benchmark measures the two servers and
not two onnxruntime configurations.

Facts about MLServer 1.7.1 that shape this module (checked on this machine):

- Its workers crash at start with uvloop 0.22+, which pip picks by default: ``uvloop<0.22``.
- Its REST server does not implement the V2 binary tensor extension: a request with an
  ``Inference-Header-Content-Length`` body is answered 422 (``json_invalid``), and outputs
  asked for with ``binary_data`` come back as JSON anyway. Over HTTP it must be sent JSON
  (:data:`SUPPORTS_BINARY_TENSORS`); its binary path is gRPC (``raw_input_contents``).
- Its gRPC server cannot be turned off: it listens on a free loopback port nobody uses.
- ``parallel_workers`` (see :data:`DEFAULT_PARALLEL_WORKERS`) decides whether inference runs in
  the HTTP process (0) or in spawned worker processes fed through multiprocessing queues.

Cold start is measured by :func:`running_mlserver` itself: from just before the process is
spawned to the first inference answered 200 (a real request on the model's own input shape,
sent the moment the model reports ready), recorded in :attr:`Peer.cold_start_s`.
:func:`cold_start_s` starts a fresh server only to read that number.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from benchmarks.procs import descendants, free_port, start_time

if TYPE_CHECKING:
    from benchmarks.models import Exported
    from benchmarks.serving import Body

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / ".bench" / "mlserver-venv"
RUNTIME_FILE = Path(__file__).resolve().parent / "mlserver_runtime" / "onnx_runtime.py"
RUNTIME_CLASS = "onnx_runtime.OnnxRuntime"
STAMP = ".normserve-installed.json"

MLSERVER_VERSION = "1.7.1"
# MLServer 1.7.1's workers crash at start with uvloop 0.22+, the version pip picks by default.
UVLOOP_SPEC = "uvloop<0.22"
# MLServer 1.7.1 over HTTP: JSON tensors only (see the module docstring).
SUPPORTS_BINARY_TENSORS = False
# Chosen by measurement on this 2-core machine (wrk, V2 JSON, one sample per request,
# adaptive batching on, interleaved rounds on a shared VM; req/s at 64 connections):
#   digits CNN: 0 -> 848, 852 | 1 (2 threads) -> 734, 692 | 2 (1 thread each) -> 851, 859
#   CIFAR CNN:  0 -> 519, 458 | 1 (2 threads) -> 456, 410 | 2 (1 thread each) -> 480, 395
# 0 runs the batch on the HTTP process's event loop; the worker modes add a pickling hop
# through multiprocessing queues and a process that competes with the HTTP process for the two
# cores. 0 is best or tied everywhere, with half the latency at 1 connection, one process of
# ~172 MiB instead of 3-4 processes of 337-600 MiB, and the fastest cold start (~1.8 s vs ~3.4 s).
DEFAULT_PARALLEL_WORKERS = 0
# normserve batches up to 64 rows; MLServer counts requests (one sample each in the benchmark).
DEFAULT_MAX_BATCH_SIZE = 64
# MLServer's batcher waits up to this long for every batch, even a lone request: at 1
# connection 2 ms gave ~220 req/s, 0.5 ms ~520-630 req/s, with 64 connections unchanged
# within the noise (0.1-1 ms: 700-1000 req/s on the digits CNN).
DEFAULT_MAX_BATCH_TIME_S = 0.0005

STOP_WITHIN_S = 20.0
PIP_TAIL_CHARS = 4000

# Loopback only: an http_proxy in the environment must never see these requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_DATATYPES = {
    "tensor(float)": ("FP32", np.float32),
    "tensor(double)": ("FP64", np.float64),
    "tensor(float16)": ("FP16", np.float16),
    "tensor(int64)": ("INT64", np.int64),
    "tensor(int32)": ("INT32", np.int32),
    "tensor(int16)": ("INT16", np.int16),
    "tensor(int8)": ("INT8", np.int8),
    "tensor(uint8)": ("UINT8", np.uint8),
    "tensor(bool)": ("BOOL", np.bool_),
}


class MLServerPeerError(RuntimeError):
    """MLServer could not be installed, started or stopped; the message carries the evidence."""


@dataclass(frozen=True)
class Peer:
    """A running MLServer, as the benchmark drives it (``url``, ``pid`` and ``cold_start_s`` as
    in ``benchmarks.serving.Server``, so the HTTP benchmark treats both servers alike)."""

    url: str  # "http://127.0.0.1:PORT"
    model_name: str
    pid: int
    log_path: Path
    started_at: float  # time.monotonic() just before the process was spawned
    ready_s: float  # started_at -> /v2/models/<name>/ready answered 200
    cold_start_s: float  # started_at -> the first inference answered 200

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``: what tritonclient takes."""
        return self.url.removeprefix("http://")

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.model_name}/infer"

    def log_tail(self, chars: int = 4000) -> str:
        return _tail(self.log_path, chars)


# --- the venv ---------------------------------------------------------------------------------


def requirements() -> list[str]:
    """What MLServer's venv gets: onnxruntime and numpy pinned to the project venv's versions,
    so both servers run the same kernels on the same arrays."""
    return [
        f"mlserver=={MLSERVER_VERSION}",
        UVLOOP_SPEC,
        f"onnxruntime=={metadata.version('onnxruntime')}",
        f"numpy=={metadata.version('numpy')}",
    ]


def ensure_mlserver_venv(path: Path = DEFAULT_VENV) -> Path:
    """A venv at ``path`` with :func:`requirements` installed; its python.

    Idempotent: the stamp file records the requirements and what pip actually installed, and
    a matching stamp skips everything (milliseconds). A missing or different stamp rebuilds
    the venv from scratch (``--clear``), so a half-finished install never survives. A file lock
    next to the venv serializes concurrent builders (two test processes, say).
    """
    path = path.resolve()
    python = path / "bin" / "python"
    wanted = requirements()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _stamp_matches(path, wanted) and python.exists():
            return python
        _run_checked([sys.executable, "-m", "venv", "--clear", str(path)], "creating the venv")
        _run_checked(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                *wanted,
            ],
            f"pip install {' '.join(wanted)}",
        )
        installed = json.loads(
            _run_checked(
                [
                    str(python),
                    "-c",
                    "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) "
                    "for p in ('mlserver', 'uvloop', 'onnxruntime', 'numpy')}))",
                ],
                "checking the installed versions",
            )
        )
        stamp = {"requirements": wanted, "installed": installed}
        (path / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        return python


def installed_versions(path: Path = DEFAULT_VENV) -> dict[str, str]:
    """What the stamp says pip installed (mlserver, uvloop, onnxruntime, numpy)."""
    stamp: dict[str, dict[str, str]] = json.loads((path / STAMP).read_text())
    return stamp["installed"]


def _stamp_matches(path: Path, wanted: list[str]) -> bool:
    try:
        return bool(json.loads((path / STAMP).read_text())["requirements"] == wanted)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _run_checked(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-PIP_TAIL_CHARS:]
        raise MLServerPeerError(
            f"building MLServer's venv failed while {what} (exit {result.returncode}):\n{output}"
        )
    return result.stdout


# --- the model directory ----------------------------------------------------------------------


def write_model_dir(
    workdir: Path,
    model_name: str,
    onnx_path: Path,
    *,
    threads: int,
    max_batch_size: int,
    max_batch_time_s: float,
    port: int,
    parallel_workers: int = DEFAULT_PARALLEL_WORKERS,
    metrics: bool = True,
) -> Path:
    """MLServer's repository for one model in ``workdir``; returns ``workdir``.

    ``settings.json`` (server) and ``<model_name>/model-settings.json`` with the runtime copied
    beside it: MLServer puts a model-settings.json's folder on sys.path to import its
    ``implementation``, in the HTTP process and in each worker, so the directory is
    self-contained and nothing depends on the caller's PYTHONPATH.

    ``debug`` is off: in MLServer it means one access-log line per request (and DEBUG logs),
    a cost the benchmark should not pay for a log nobody reads. ``metrics`` stays on by
    default because normserve always counts its requests for Prometheus; MLServer serves them
    on its own port.
    """
    if max_batch_size < 2 or max_batch_time_s <= 0:
        # MLServer silently serves unbatched below these (batching/hooks.py, load_batching).
        raise ValueError(
            "adaptive batching needs max_batch_size >= 2 and max_batch_time_s > 0, got "
            f"{max_batch_size} and {max_batch_time_s}"
        )
    workdir = workdir.resolve()
    model_dir = workdir / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    settings: dict[str, object] = {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": port,
        # Cannot be disabled in 1.7.1: a free loopback port that nobody calls.
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "metrics_endpoint": "/metrics" if metrics else None,
        "metrics_dir": str(workdir / ".metrics"),
        "environments_dir": str(workdir / ".envs"),
        "parallel_workers": parallel_workers,
        "load_models_at_startup": True,
    }
    model_settings = {
        "name": model_name,
        "implementation": RUNTIME_CLASS,
        "max_batch_size": max_batch_size,
        "max_batch_time": max_batch_time_s,
        "parameters": {
            "uri": str(onnx_path.resolve()),
            "extra": {"intra_op_threads": threads},
        },
    }
    (workdir / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2) + "\n")
    shutil.copyfile(RUNTIME_FILE, model_dir / RUNTIME_FILE.name)
    return workdir


def _model_settings(model_dir: Path) -> dict[str, object]:
    found = sorted(model_dir.glob("*/model-settings.json"))
    if len(found) != 1:
        raise MLServerPeerError(
            f"{model_dir} must hold exactly one */model-settings.json (write_model_dir writes "
            f"one), found {len(found)}"
        )
    settings: dict[str, object] = json.loads(found[0].read_text())
    return settings


def sample_request(onnx_path: Path, batch: int = 1) -> bytes:
    """A V2 JSON body of zeros for every input of the ONNX file (symbolic dims -> ``batch`` on
    axis 0, 1 elsewhere): a real inference for the cold-start probe."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = []
    for spec in session.get_inputs():
        if spec.type not in _DATATYPES:
            raise MLServerPeerError(f"input '{spec.name}' has unsupported type {spec.type}")
        datatype, dtype = _DATATYPES[spec.type]
        shape = [
            d if isinstance(d, int) and d > 0 else (batch if axis == 0 else 1)
            for axis, d in enumerate(spec.shape)
        ]
        data: list[object] = np.zeros(shape, dtype).reshape(-1).tolist()
        inputs.append({"name": spec.name, "datatype": datatype, "shape": shape, "data": data})
    return json.dumps({"inputs": inputs}).encode()


# --- running it -------------------------------------------------------------------------------


@contextmanager
def running_mlserver(
    python: Path,
    model_dir: Path,
    port: int,
    *,
    ready_timeout_s: float = 60,
    probe: bytes | None = None,
) -> Iterator[Peer]:
    """``mlserver start model_dir`` with the venv of ``python``, ready and warmed by one real
    inference; stopped on exit with every process it spawned.

    ``probe`` is the V2 JSON body of that first inference (default: zeros shaped like the ONNX
    file's inputs, :func:`sample_request`). The log goes to ``model_dir/mlserver.log``. The
    clock starts just before the spawn and readiness is polled every 5 ms, as
    ``benchmarks.serving`` polls normserve, so the two cold starts are measured alike.
    """
    model_dir = model_dir.resolve()
    settings = _model_settings(model_dir)
    name = str(settings["name"])
    if probe is None:
        parameters = settings.get("parameters")
        uri = parameters.get("uri") if isinstance(parameters, dict) else None
        if not uri:
            raise MLServerPeerError(f"{model_dir}: model-settings.json has no parameters.uri")
        probe = sample_request(Path(str(uri)))
    log_path = model_dir / "mlserver.log"
    url = f"http://127.0.0.1:{port}"
    bin_dir = Path(python).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(bin_dir.parent),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PYTHONPATH", None)  # the project's paths mean nothing in MLServer's venv
    with open(log_path, "wb") as log:
        started_at = time.monotonic()
        # The CLI's entry point is the console script (mlserver.cli:main; the package has no
        # __main__), run with this venv's python.
        proc = subprocess.Popen(
            [str(python), str(bin_dir / "mlserver"), "start", str(model_dir)],
            cwd=model_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        ready_s = _wait_ready(proc, url, name, started_at, ready_timeout_s, log_path)
        cold_s = _first_inference(proc, url, name, probe, started_at, log_path)
        yield Peer(
            url=url,
            model_name=name,
            pid=proc.pid,
            log_path=log_path,
            started_at=started_at,
            ready_s=ready_s,
            cold_start_s=cold_s,
        )
    finally:
        stop(proc)


def cold_start_s(python: Path, model_dir: Path, port: int, *, ready_timeout_s: float = 60) -> float:
    """Seconds from spawning a fresh MLServer to its first inference answered 200."""
    with running_mlserver(python, model_dir, port, ready_timeout_s=ready_timeout_s) as peer:
        return peer.cold_start_s


@contextmanager
def serve_for_benchmark(
    python: Path,
    model: Exported,
    work: Path,
    probe: Body,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_batch_time_s: float = DEFAULT_MAX_BATCH_TIME_S,
    parallel_workers: int = DEFAULT_PARALLEL_WORKERS,
) -> Iterator[Peer]:
    """MLServer serving ``model``'s folded ONNX file (the file normserve serves) for the HTTP
    benchmark, with normserve's CPU budget split as normserve splits it: all of it to the one
    inference process when ``parallel_workers`` is 0, an equal share per worker otherwise."""
    from service.settings import cpu_budget  # the project's venv: normserve's own rule

    if probe.format != "v2-json":
        raise MLServerPeerError(
            f"MLServer {MLSERVER_VERSION} speaks only V2 JSON over HTTP, not {probe.format}"
        )
    threads = max(1, cpu_budget() // max(1, parallel_workers))
    port = free_port()
    model_dir = write_model_dir(
        work / f"mlserver-{model.spec.name}",
        model.spec.name,
        model.folded,
        threads=threads,
        max_batch_size=max_batch_size,
        max_batch_time_s=max_batch_time_s,
        port=port,
        parallel_workers=parallel_workers,
    )
    with running_mlserver(python, model_dir, port, probe=probe.content) as peer:
        yield peer


def _wait_ready(
    proc: subprocess.Popen[bytes],
    url: str,
    name: str,
    started_at: float,
    timeout_s: float,
    log_path: Path,
) -> float:
    url = f"{url}/v2/models/{name}/ready"
    deadline = started_at + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MLServerPeerError(
                f"MLServer exited with {proc.returncode} before '{name}' was ready:\n"
                f"{_tail(log_path)}"
            )
        try:
            with _OPENER.open(url, timeout=2.0) as response:
                if response.status == 200:
                    return time.monotonic() - started_at
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or 400 while the model loads
        time.sleep(0.005)
    raise MLServerPeerError(
        f"MLServer's model '{name}' was not ready within {timeout_s:.0f} s:\n{_tail(log_path)}"
    )


def _first_inference(
    proc: subprocess.Popen[bytes],
    url: str,
    name: str,
    body: bytes,
    started_at: float,
    log_path: Path,
) -> float:
    request = urllib.request.Request(
        f"{url}/v2/models/{name}/infer",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with _OPENER.open(request, timeout=30.0) as response:
            json.loads(response.read())
            return time.monotonic() - started_at
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:1000]
        raise MLServerPeerError(
            f"MLServer's first inference on '{name}' answered {exc.code}: {detail}\n"
            f"{_tail(log_path)}"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        state = "running" if proc.poll() is None else f"exited with {proc.returncode}"
        raise MLServerPeerError(
            f"MLServer's first inference on '{name}' failed ({exc}); the server is {state}:\n"
            f"{_tail(log_path)}"
        ) from exc


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the started PID (MLServer then stops its workers), SIGKILL only past
    :data:`STOP_WITHIN_S`; then any descendant still alive is killed by PID, so no worker or
    multiprocessing resource tracker outlives the benchmark.

    Descendants are listed before the signal (they are reparented once MLServer exits) with
    their start times, so a PID reused by an unrelated process is never signalled.
    """
    family = [(pid, start_time(pid)) for pid in descendants(proc.pid)]
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_WITHIN_S)
    deadline = time.monotonic() + STOP_WITHIN_S / 2
    while True:
        alive = [pid for pid, start in family if start is not None and start_time(pid) == start]
        if not alive:
            return
        if time.monotonic() > deadline:
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_WITHIN_S / 2
        time.sleep(0.05)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(log unreadable: {exc})"
