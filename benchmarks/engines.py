"""In-process engines on one model, measured in interleaved rounds under the same thread budget.

Engines: torch eager (eval, inference_mode); onnxruntime on the unfolded ONNX and on the
folded ONNX with graph optimizations disabled (what folding alone buys); onnxruntime exactly
as the service configures it (``service.serving.runtime.ort_session_options``); OpenVINO fp32 when
installed (it reads the ONNX file directly). Every round measures every engine at every
thread count before the next round starts, so a slow period of this shared VM hits all of
them, and each measurement records how much CPU other processes used meanwhile.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.models import Exported
from service.serving.runtime import ort_session_options

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Other processes using more than this many cores during a measurement make it noisy.
NOISY_CORES = 0.25
SERVED = "as served"

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Engine:
    name: str
    threads: int
    make: Callable[[], Runner]  # built lazily, once per thread count


def _torch_runner(model: torch.nn.Module, threads: int) -> Runner:
    def run(x: np.ndarray) -> np.ndarray:
        torch.set_num_threads(threads)  # global in torch: set for each call, it is cheap
        with torch.inference_mode():
            out: np.ndarray = model(torch.from_numpy(x)).numpy()
        return out

    return run


def _ort_runner(path: Path, options: ort.SessionOptions) -> Runner:
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        out: np.ndarray = session.run(None, {name: x})[0]
        return out

    return run


def _openvino_runner(path: Path, threads: int, precision: str) -> Runner:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(str(path)),
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        },
    )
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({0: x})
        return np.array(request.get_output_tensor(0).data, copy=True)

    return run


def _served_runner(model: Exported, threads: int) -> Runner:
    from service.repository import read_config, verified_file
    from service.serving.runtime import OnnxModel, SessionOptions

    if model.repository is None:
        raise ValueError(f"{model.spec.name}: no repository entry to serve from")
    config = read_config(model.repository / model.spec.name / "config.json")
    path = verified_file(model.repository, config, config.latest)
    served = OnnxModel(config, config.latest, path, SessionOptions(intra_op_threads=threads))
    input_name, output_name = config.inputs[0].name, config.outputs[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return served.run({input_name: x})[output_name]

    return run


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def engines_for(model: Exported, threads: int) -> list[Engine]:
    disabled = ort_session_options(threads, "disable")
    engines = [
        Engine("torch eager", threads, lambda: _torch_runner(model.torch_model, threads)),
        Engine("ort unfolded, opt off", threads, lambda: _ort_runner(model.unfolded, disabled)),
        Engine("ort folded, opt off", threads, lambda: _ort_runner(model.folded, disabled)),
        Engine(
            "ort opt all",
            threads,
            lambda: _ort_runner(model.folded, ort_session_options(threads, "all")),
        ),
        # Exactly what the service runs: its own OnnxModel on the repository entry that
        # `python -m export tune` configured (engine and optimization level chosen by data).
        Engine(SERVED, threads, lambda: _served_runner(model, threads)),
    ]
    if model.int8 is not None:
        int8 = model.int8
        all_on = ort_session_options(threads, "all")
        engines.append(Engine("ort int8", threads, lambda: _ort_runner(int8, all_on)))
    if openvino_available():
        engines.append(
            Engine("openvino fp32", threads, lambda: _openvino_runner(model.folded, threads, "f32"))
        )
        if model.int8 is not None:
            int8 = model.int8
            # The same QDQ file: OpenVINO turns its Quantize/Dequantize pairs into int8 kernels.
            engines.append(
                Engine("openvino int8", threads, lambda: _openvino_runner(int8, threads, "f32"))
            )
    return engines


@dataclass
class Sample:
    """One measurement of one engine: its value and how busy the rest of the machine was."""

    value: float
    other_cores: float

    @property
    def noisy(self) -> bool:
        return self.other_cores > NOISY_CORES


@dataclass
class EngineResult:
    engine: str
    threads: int
    latency_p50_ms: list[Sample] = field(default_factory=list)
    latency_p99_ms: list[Sample] = field(default_factory=list)
    throughput: dict[int, list[Sample]] = field(default_factory=dict)  # batch -> samples/s
    max_abs_vs_torch: float = 0.0

    def summary(self) -> dict[str, object]:
        return {
            "engine": self.engine,
            "threads": self.threads,
            "latency_b1_p50_ms": quiet_median(self.latency_p50_ms),
            "latency_b1_p99_ms": quiet_median(self.latency_p99_ms),
            **{f"samples_per_s_b{b}": quiet_median(s) for b, s in self.throughput.items()},
            "noisy_rounds": sum(s.noisy for s in self.latency_p50_ms),
            "max_abs_vs_torch": self.max_abs_vs_torch,
        }


def quiet_median(samples: list[Sample]) -> float:
    """The median of the quiet rounds, or of all rounds if none was quiet."""
    quiet = [s.value for s in samples if not s.noisy] or [s.value for s in samples]
    return statistics.median(quiet) if quiet else float("nan")


def busy_ticks() -> int:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return user + nice + system + irq + softirq + steal


def own_ticks() -> int:
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


@contextmanager
def other_load() -> Iterator[list[float]]:
    """Yields a list that receives the cores other processes used during the block."""
    box: list[float] = []
    busy, own, start = busy_ticks(), own_ticks(), time.perf_counter()
    yield box
    elapsed = time.perf_counter() - start
    others = (busy_ticks() - busy) - (own_ticks() - own)
    box.append(max(0.0, others / CLOCK_TICKS / max(elapsed, 1e-9)))


def measure_latency(run: Runner, x: np.ndarray, iterations: int) -> tuple[float, float]:
    """(p50, p99) in ms of single calls."""
    times = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        run(x)
        times.append((time.perf_counter_ns() - start) / 1e6)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(len(times) * 0.99))]


def measure_throughput(run: Runner, x: np.ndarray, seconds: float) -> float:
    """Samples per second over at least ``seconds`` of back-to-back calls."""
    calls, start = 0, time.perf_counter()
    while True:
        run(x)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 3:
            return calls * x.shape[0] / elapsed


def benchmark_engines(
    model: Exported,
    thread_counts: list[int],
    rounds: int,
    batches: tuple[int, ...] = (32, 128),
    latency_iterations: int = 200,
    throughput_seconds: float = 0.5,
    log: Callable[[str], None] = print,
) -> list[EngineResult]:
    rng = np.random.default_rng(0)
    inputs = {b: rng.random((b, *model.spec.input_shape), dtype=np.float32) for b in (1, *batches)}
    engines = [e for t in thread_counts for e in engines_for(model, t)]
    runners = {(e.name, e.threads): e.make() for e in engines}
    results = {(e.name, e.threads): EngineResult(e.name, e.threads) for e in engines}
    reference = _torch_runner(model.torch_model, 1)(inputs[32])
    for key, run in runners.items():
        results[key].max_abs_vs_torch = float(np.abs(run(inputs[32]) - reference).max())
        for x in inputs.values():  # warm-up: first calls allocate and pick kernels
            run(x)
    for round_index in range(rounds):
        for key, run in runners.items():
            result = results[key]
            with other_load() as load:
                p50, p99 = measure_latency(run, inputs[1], latency_iterations)
            result.latency_p50_ms.append(Sample(p50, load[0]))
            result.latency_p99_ms.append(Sample(p99, load[0]))
            for b in batches:
                with other_load() as load:
                    rate = measure_throughput(run, inputs[b], throughput_seconds)
                result.throughput.setdefault(b, []).append(Sample(rate, load[0]))
        log(f"  [{model.spec.name}] engines round {round_index + 1}/{rounds} done")
    return list(results.values())
