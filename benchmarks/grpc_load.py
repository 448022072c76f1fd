"""A lean gRPC load generator: ``concurrency`` calls of one fixed ModelInfer in flight for
``duration_s``, from a child process, measured like wrk (``WrkResult``).

No perf_analyzer here (the tritonclient wheel no longer ships it, and no other gRPC load tool
is installed), so this is grpcio's asyncio client at its cheapest: the request is serialized
once and sent as bytes, answers are not parsed (only their status is read), and the calls
share a few HTTP/2 connections (one per 16 calls in flight). It still costs more CPU per
request than wrk does per HTTP request, on the cores the server also uses: its CPU is counted
with the load generator's in each point (``measure`` in benchmarks.http), so the numbers
favour HTTP, if anything.

    python -m benchmarks.grpc_load HOST:PORT REQUEST_FILE CONCURRENCY DURATION_S

prints one JSON line. Loopback only, as wrk.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.wrk import LOOPBACK_HOSTS, WrkErrors, WrkResult

INFER = "/inference.GRPCInferenceService/ModelInfer"
CALLS_PER_CONNECTION = 16
_EXTRA_WAIT_S = 60.0


def run_grpc_load(
    url: str, request: bytes, concurrency: int, duration_s: float, workdir: Path
) -> WrkResult:
    host = url.rsplit(":", 1)[0]
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"load tests target loopback only, not {host!r}")
    request_file = workdir / "grpc-request.bin"
    request_file.write_bytes(request)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.grpc_load", url, str(request_file),
         str(concurrency), str(duration_s)],
        capture_output=True, text=True, timeout=duration_s + _EXTRA_WAIT_S, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"gRPC load generator failed: {done.stderr[-2000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return WrkResult(
        connections=concurrency,
        threads=1,
        duration_s=data["duration_s"],
        requests=data["requests"],
        requests_per_s=data["requests"] / data["duration_s"],
        p50_ms=data["p50_ms"],
        p90_ms=data["p90_ms"],
        p99_ms=data["p99_ms"],
        p999_ms=data["p999_ms"],
        max_ms=data["max_ms"],
        mean_ms=data["mean_ms"],
        errors=WrkErrors(connect=0, read=0, write=0, timeout=0, status=data["errors"]),
    )


async def _load(url: str, request: bytes, concurrency: int, duration_s: float) -> dict[str, float]:
    import grpc  # the child only: the parent never loads grpcio for this

    channels = [
        grpc.aio.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, -(-concurrency // CALLS_PER_CONNECTION)))
    ]
    calls = [
        channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        for channel in channels
    ]
    for call in calls:  # connect and warm up before the clock starts
        await call(request, timeout=30)
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration_s

    async def worker(call: grpc.aio.UnaryUnaryMultiCallable) -> None:
        nonlocal errors
        record = latencies.append
        clock = time.perf_counter
        while (started := clock()) < stop:
            try:
                await call(request, timeout=30)
            except grpc.aio.AioRpcError:
                errors += 1
            record(clock() - started)

    began = time.perf_counter()
    await asyncio.gather(*(worker(calls[i % len(calls)]) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    for channel in channels:
        await channel.close()
    ms = np.array(latencies) * 1000
    quantile = (lambda q: float(np.quantile(ms, q))) if ms.size else (lambda q: 0.0)
    return {
        "requests": len(latencies),
        "duration_s": elapsed,
        "errors": errors,
        "p50_ms": quantile(0.5),
        "p90_ms": quantile(0.9),
        "p99_ms": quantile(0.99),
        "p999_ms": quantile(0.999),
        "max_ms": float(ms.max()) if ms.size else 0.0,
        "mean_ms": float(ms.mean()) if ms.size else 0.0,
    }


def main(argv: list[str]) -> int:
    url, request_file, concurrency, duration_s = argv
    request = Path(request_file).read_bytes()
    print(json.dumps(asyncio.run(_load(url, request, int(concurrency), float(duration_s)))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
