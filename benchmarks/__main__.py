"""``python -m benchmarks``: engines in-process and the HTTP service under wrk, side by side.

Writes ``bench.json`` (every measurement), ``bench.md`` (the tables and the goals, each
with its ratio) and ``bench.png`` to ``--out``. All ratios are between numbers measured in
this one run, never against numbers from another run.
"""

from __future__ import annotations

import argparse
import compileall
import json
import platform
import sys
import time
import timeit
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.engines import benchmark_engines, openvino_available
from benchmarks.http import Target, load_matrix
from benchmarks.models import BENCH_MODELS, Exported, export_model
from benchmarks.overload import overload_benchmark
from benchmarks.perf_analyzer import (
    perf_analyzer_available,
    run_perf_analyzer,
    write_input_data,
)
from benchmarks.procs import largest_rss_bytes, tree_rss_bytes
from benchmarks.report import evaluate_goals, plot, write_markdown
from benchmarks.sequence import sequence_benchmark
from benchmarks.serving import bench_repository, bodies, running_normserve
from benchmarks.wrk import wrk_available
from service.settings import auto_workers, session_threads

ROOT = Path(__file__).resolve().parents[1]
# The variable-length model's load points: one client, and the 64 connections the issue asks
# for (mixed lengths against equal lengths).
SEQUENCE_CONCURRENCY = [1, 64]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("model_repository"),
        help="the default models' repository (cold start)",
    )
    parser.add_argument("--models", default=",".join(BENCH_MODELS), help="engine benchmark models")
    parser.add_argument("--http-models", default="cifar_cnn", help="models loaded over HTTP")
    parser.add_argument("--threads", default="1,2", help="in-process thread counts, interleaved")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved engine rounds")
    parser.add_argument("--http-rounds", type=int, default=3, help="interleaved HTTP rounds")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per HTTP point")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--cold-starts", type=int, default=5, help="server starts to time")
    parser.add_argument("--mlserver-venv", type=Path, default=Path(".bench/mlserver-venv"))
    parser.add_argument("--no-mlserver", action="store_true", help="skip the MLServer peer")
    parser.add_argument("--no-http", action="store_true", help="engines only")
    parser.add_argument(
        "--no-sequence",
        action="store_true",
        help="skip the variable-length model (mixed vs equal lengths under load)",
    )
    parser.add_argument(
        "--export-model",
        default="resnet50:224",
        help="torchvision MODEL:SIDE whose export the tool and plain torch.onnx.export time "
        "side by side ('none' skips it)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round, 1 s points, concurrency 1 and 64: a smoke run",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.http_rounds, args.duration = 1, 1, 1.0
        args.concurrency, args.cold_starts = "1,64", 1
        if args.export_model == parser.get_default("export_model"):
            args.export_model = "resnet18:64"
    return args


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {k: str(v) for k, v in vars(args).items()},
    }

    names = args.models.split(",")
    http_names = [] if args.no_http else args.http_models.split(",")
    log(f"exporting {', '.join(sorted(set(names) | set(http_names)))} with the export tool")
    exported = {
        n: export_model(BENCH_MODELS[n], work, args.checkpoints)
        for n in sorted(set(names) | set(http_names))
    }
    top = max(int(t) for t in args.threads.split(","))
    for n, e in list(exported.items()):
        log(f"[{n}] python -m export tune ({top} threads): engine and level for the service")
        exported[n] = tuned(e, work / f"repository-{n}", top, rounds=min(3, args.rounds))
    report["models"] = {
        n: {
            "description": e.spec.description,
            "input": list(e.spec.input_shape),
            "parity_max_abs": e.parity_max_abs,
            "bn_folded": e.report.bn_folded,
            "nodes_before": e.report.nodes_before,
            "nodes_after": e.report.nodes_after,
            "int8": _int8_summary(e),
            "served_runtime": e.served_runtime,
            "served_same_as": e.served_same_as,
        }
        for n, e in exported.items()
    }

    threads = [int(t) for t in args.threads.split(",")]
    if not openvino_available():
        log("OpenVINO is not installed (pip install openvino): its rows are left out")
    report["engines"] = {}
    for name in names:
        log(f"[{name}] in-process engines, threads {threads}, {args.rounds} rounds")
        results = benchmark_engines(exported[name], threads, args.rounds, log=log)
        report["engines"][name] = [r.summary() for r in results]

    report["export_time"] = export_timing(args)
    report["cold_start"] = cold_starts(args, work)
    if http_names:
        reason = wrk_available()
        if reason is not None:
            log(f"HTTP benchmark skipped: {reason}")
            report["http_skipped"] = reason
        else:
            report["http"] = {n: http_benchmark(exported[n], args, work) for n in http_names}
            report["overload"] = {n: overload(exported[n], args, work) for n in http_names}
            # What `make serve` serves, and what a user overloads first.
            sample = np.random.default_rng(0).random((1, 8, 8), dtype=np.float32)
            digits = bodies("digits_cnn", sample, input_name="image")["v2-json"]
            report["overload"]["digits_cnn"] = overload_benchmark(
                args.repository, digits, args.http_rounds, args.duration, work, log
            )
            if not args.no_sequence:
                report["sequence"] = sequence_benchmark(
                    args.repository,
                    SEQUENCE_CONCURRENCY,
                    args.http_rounds,
                    args.duration,
                    top,
                    work,
                    log,
                )

    report["goals"] = evaluate_goals(report)
    report["elapsed_s"] = time.monotonic() - started
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    markdown = write_markdown(report, out / "bench.md")
    plot(report, out / "bench.png")
    print(markdown)
    log(
        f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'} "
        f"in {report['elapsed_s']:.0f} s"
    )
    return 0


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": len(__import__("os").sched_getaffinity(0)),
        "python": platform.python_version(),
        "python_loop_us": interpreter_speed_us(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def export_timing(args: argparse.Namespace) -> dict[str, Any]:
    """The export tool against a plain torch.onnx.export of the same torchvision model."""
    if args.export_model == "none":
        return {"skipped": "--export-model none"}
    name, _, side = args.export_model.partition(":")
    rounds = 1 if args.quick else 3
    log(f"export time: {name} at {side}x{side}, tool vs plain torch.onnx.export, {rounds} rounds")
    try:
        from benchmarks.export_time import time_export
    except ModuleNotFoundError as exc:  # torchvision is a dev extra
        log(f"export time skipped: {exc}")
        return {"skipped": str(exc)}
    return time_export(name, int(side or 224), rounds, log)


def cold_starts(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Start the service on the default repository repeatedly: time to the first answered
    inference (which implies ready), and RSS once answered."""
    repository: Path = args.repository
    if not (repository / "digits_cnn" / "config.json").exists():
        log(f"cold start skipped: no default repository at {repository} (make repository)")
        return {"skipped": f"no repository at {repository}"}
    body = bodies("digits_cnn", np.zeros((1, 8, 8), np.float32), input_name="image")["v2-json"]
    # The image compiles the service's byte-code at build time (Dockerfile) and the venv's is
    # compiled at install; a checkout run with PYTHONDONTWRITEBYTECODE (as the image sets it)
    # would compile ~60 modules from source at every start (~0.1 s): not what is deployed.
    compileall.compile_dir(ROOT / "service", quiet=1)
    times, rss, worker_rss = [], [], []
    for _ in range(args.cold_starts):
        with running_normserve("cold-start", repository, body, work) as server:
            times.append(server.cold_start_s)
            rss.append(tree_rss_bytes(server.pid))
            worker_rss.append(largest_rss_bytes(server.pid))
    log(f"cold start to first inference (default models): {[round(t, 3) for t in times]} s")
    return {
        "normserve_first_inference_s": times,
        "normserve_rss_bytes": rss,
        "normserve_worker_rss_bytes": worker_rss,
        "workers": auto_workers(),
    }


# The bench's engine row that runs the same configuration as each tuned choice.
_SAME_AS = {"disable": "ort folded, opt off", "all": "ort opt all", "openvino": "openvino fp32"}


def tuned(model: Exported, root: Path, threads: int, rounds: int) -> Exported:
    """Publish the model into its own repository and let the export tool choose its runtime."""
    from dataclasses import replace

    from export.tune import tune

    bench_repository([model], root)
    result = tune(root, model.spec.name, threads=threads, rounds=rounds)
    for line in result.table().splitlines():
        log(f"    {line}")
    runtime = result.chosen.runtime
    key = "openvino" if runtime.engine == "openvino" else runtime.graph_optimization_level
    return replace(
        model,
        repository=root,
        served_runtime=result.chosen.label,
        served_same_as=_SAME_AS.get(key or "", ""),
    )


def _int8_summary(model: Exported) -> dict[str, Any]:
    """The export tool's int8 gate as measured: accuracy for digits, agreement otherwise."""
    r = model.int8_report
    if r is None:
        return {"refused": model.int8_refused}
    return {
        "samples": r.samples,
        "fp32_accuracy": r.fp32_accuracy,
        "int8_accuracy": r.int8_accuracy,
        "top1_agreement": r.agreement,
        "max_abs_error": r.max_abs_error,
        "quantized_weights": r.quantized_weights,
    }


def http_benchmark(model: Exported, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    name = model.spec.name
    repository = model.repository or bench_repository([model], work / f"repository-{name}")
    sample = np.random.default_rng(0).random(model.spec.input_shape, dtype=np.float32)
    wire = bodies(name, sample)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    result: dict[str, Any] = {}
    with ExitStack() as stack:
        on = stack.enter_context(
            running_normserve("normserve", repository, wire["v2-binary"], work)
        )
        off = stack.enter_context(
            running_normserve(
                "normserve-nobatch",
                repository,
                wire["v2-binary"],
                work,
                {"NORMSERVE_MAX_BATCH_SIZE": "1"},
            )
        )
        targets = [Target("normserve", on.url, on.pid, wire[f]) for f in wire]
        targets += [
            Target("normserve, batching off", off.url, off.pid, wire[f])
            for f in ("v2-json", "v2-binary")
        ]
        workers = auto_workers()
        result["servers"] = {
            "normserve": {"workers": workers, "threads": session_threads(workers)},
        }
        if workers > 1:
            # The default (workers=auto) against one process with every thread: the event
            # loop, not onnxruntime, limits one process under load (README: Choosing the
            # number of workers).
            single = stack.enter_context(
                running_normserve(
                    "normserve-single",
                    repository,
                    wire["v2-binary"],
                    work,
                    {"NORMSERVE_WORKERS": "1"},
                )
            )
            targets += [
                Target(SINGLE_SERVER, single.url, single.pid, wire[f])
                for f in ("v2-json", "v2-binary")
            ]
            result["servers"][SINGLE_SERVER] = {"workers": 1, "threads": session_threads(1)}
        result["cold_start_s"] = {"normserve": on.cold_start_s}
        peer = None if args.no_mlserver else start_mlserver(stack, model, args, work, wire)
        if peer is not None:
            targets.append(Target("mlserver", peer.url, peer.pid, wire["v2-json"]))
            result["cold_start_s"]["mlserver"] = peer.cold_start_s
        log(
            f"[{name}] HTTP: {len(targets)} targets × concurrency {concurrencies} × "
            f"{args.http_rounds} rounds × {args.duration:.0f} s"
        )
        series = load_matrix(targets, concurrencies, args.http_rounds, args.duration, work, log)
        data = write_input_data(work / f"perf_analyzer-{name}.json", {"input": sample})
        result["perf_analyzer"] = perf_analyzer_rows(
            name, on.url, data, concurrencies, args, work, grpc_url=on.grpc_url
        )
        pids = {"normserve": on.pid}
        if workers > 1:
            pids[SINGLE_SERVER] = single.pid
        if peer is not None:
            pids["mlserver"] = peer.pid
        result["rss_after_load_bytes"] = {k: tree_rss_bytes(pid) for k, pid in pids.items()}
        # One worker's: the goal's measure, whatever the number of workers.
        result["worker_rss_bytes"] = {k: largest_rss_bytes(pid) for k, pid in pids.items()}
    result["series"] = [row for s in series for row in s.summary()]
    return result


def overload(model: Exported, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    name = model.spec.name
    repository = model.repository or bench_repository([model], work / f"repository-{name}")
    sample = np.random.default_rng(0).random(model.spec.input_shape, dtype=np.float32)
    body = bodies(name, sample)["v2-json"]
    return overload_benchmark(repository, body, args.http_rounds, args.duration, work, log)


def perf_analyzer_rows(
    model: str,
    url: str,
    input_data: str,
    concurrencies: list[int],
    args: argparse.Namespace,
    work: Path,
    grpc_url: str | None = None,
) -> dict[str, Any]:
    """Triton's own load generator against the same server and sample as wrk, binary and
    JSON, and over gRPC (raw contents, ``-i grpc``) when ``grpc_url`` is given, unary calls
    and ModelStreamInfer (``--streaming``: what tritonclient's ``start_stream`` uses): its
    client latencies and the server-side breakdown it reads from the statistics."""
    reason = perf_analyzer_available()
    if reason is not None:
        log(f"perf_analyzer skipped: {reason}")
        return {"skipped": reason}
    rows = []
    ways: list[tuple[str, str, str, tuple[str, ...]]] = [
        ("http", "binary", "v2-binary", ()),
        ("http", "json", "v2-json", ()),
    ]
    if grpc_url is not None:
        ways.append(("grpc", "binary", "grpc-raw", ()))
        ways.append(("grpc", "binary", "grpc-stream", ("--streaming",)))
    for concurrency in concurrencies:
        for protocol, fmt, label, extra in ways:
            r = run_perf_analyzer(
                url.removeprefix("http://") if protocol == "http" else grpc_url or "",
                model,
                protocol="grpc" if protocol == "grpc" else "http",
                concurrency=concurrency,
                input_format="binary" if protocol == "grpc" else fmt,
                input_data=input_data,
                window_ms=int(args.duration * 1000),
                stability_percent=1000,  # any 3 windows: a shared VM is never "stable"
                max_trials=3,
                workdir=work,
                extra_args=extra,
            )
            s = r.server
            log(
                f"  perf_analyzer c={concurrency:<3} {label:<9} {r.throughput_per_s:8.0f} req/s"
                f"  p50 {r.p50_us / 1000:6.2f} ms  p99 {r.p99_us / 1000:6.2f} ms  server: queue "
                f"{s.queue_us:.0f} + input {s.compute_input_us:.0f} + infer "
                f"{s.compute_infer_us:.0f} + output {s.compute_output_us:.0f} + overhead "
                f"{s.overhead_us:.0f} µs"
            )
            rows.append({"format": label, **r.to_dict()})
    return {"rows": rows}


def interpreter_speed_us() -> float:
    """Best of 5: µs for 1,000 dict lookups, a fixed yardstick of the interpreter's speed.

    Served requests/s depend on it as much as on the CPU: pyenv's default build (no PGO,
    shared libpython) took ~40 µs here where Debian's python3.11 took ~32.
    """
    timer = timeit.Timer("for _ in range(1000): d.get('a')", setup="d = {'a': 1}")
    return round(min(timer.repeat(repeat=5, number=200)) / 200 * 1e6, 1)


# The one-process alternative to the default, measured beside it where the default is more.
SINGLE_SERVER = "normserve, 1 worker"


def start_mlserver(
    stack: ExitStack, model: Exported, args: argparse.Namespace, work: Path, wire: dict[str, Any]
) -> Any:
    try:
        from benchmarks import mlserver_peer
    except ImportError as exc:  # pragma: no cover - the module ships with the package
        log(f"MLServer peer unavailable: {exc}")
        return None
    try:
        python = mlserver_peer.ensure_mlserver_venv(args.mlserver_venv)
    except Exception as exc:  # pip or network: report and go on without the peer
        log(f"MLServer peer skipped: {exc}")
        return None
    return stack.enter_context(
        mlserver_peer.serve_for_benchmark(python, model, work, wire["v2-json"])
    )


if __name__ == "__main__":
    sys.exit(main())
