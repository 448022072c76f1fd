"""HTTP load: every (server, wire format) pair under wrk at each concurrency, interleaved.

All servers run side by side for the whole measurement, and each round visits every
concurrency and every pair before the next round starts, so a slow period of this shared VM
lands on all of them. Each point records the server's CPU and the cores used by everything
else (not the server, not wrk, not this process): a point where others used more than
``NOISY_CORES`` is marked noisy and medians prefer the quiet rounds.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.engines import CLOCK_TICKS, Sample, busy_ticks, own_ticks, quiet_median
from benchmarks.serving import Body
from benchmarks.wrk import WrkResult, process_cpu_seconds, run_wrk


@dataclass(frozen=True)
class Target:
    """One server speaking one wire format."""

    server: str  # "normserve" | "normserve, batching off" | "mlserver"
    url: str
    pid: int
    body: Body

    @property
    def label(self) -> str:
        return f"{self.server} / {self.body.format}"


@dataclass
class Point:
    result: WrkResult
    server_cores: float
    other_cores: float

    @property
    def noisy(self) -> bool:
        return Sample(0.0, self.other_cores).noisy


@dataclass
class Series:
    target: Target
    points: dict[int, list[Point]] = field(default_factory=dict)  # concurrency -> rounds

    def median(self, concurrency: int, metric: Callable[[Point], float]) -> float:
        """The engines' rule: the median of the quiet rounds, or of all if none was quiet."""
        rounds = self.points.get(concurrency, [])
        return quiet_median([Sample(metric(p), p.other_cores) for p in rounds])

    def summary(self) -> list[dict[str, object]]:
        rows = []
        for concurrency, rounds in sorted(self.points.items()):
            rows.append(
                {
                    "server": self.target.server,
                    "format": self.target.body.format,
                    "concurrency": concurrency,
                    "requests_per_s": self.median(concurrency, lambda p: p.result.requests_per_s),
                    "p50_ms": self.median(concurrency, lambda p: p.result.p50_ms),
                    "p99_ms": self.median(concurrency, lambda p: p.result.p99_ms),
                    "errors": sum(p.result.errors_total for p in rounds),
                    "server_cores": self.median(concurrency, lambda p: p.server_cores),
                    "noisy_rounds": sum(p.noisy for p in rounds),
                    "rounds": [
                        {
                            **p.result.to_dict(),
                            "server_cores": p.server_cores,
                            "other_cores": p.other_cores,
                        }
                        for p in rounds
                    ],
                }
            )
        return rows


def measure(target: Target, concurrency: int, duration_s: float, workdir: Path) -> Point:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy, own, server = busy_ticks(), own_ticks(), process_cpu_seconds(target.pid)
    start = time.perf_counter()
    result = run_wrk(
        target.url + target.body.path,
        target.body.contents or target.body.content,
        content_type=target.body.content_type,
        headers=target.body.headers,
        connections=concurrency,
        threads=1,  # one load thread: wrk's CPU is CPU the server does not get
        duration_s=duration_s,
        workdir=workdir,
    )
    elapsed = time.perf_counter() - start
    server_s = process_cpu_seconds(target.pid) - server
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_s = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    total_s = (busy_ticks() - busy) / CLOCK_TICKS
    own_s = (own_ticks() - own) / CLOCK_TICKS
    other = max(0.0, total_s - server_s - wrk_s - own_s) / elapsed
    return Point(result, server_s / elapsed, other)


def load_matrix(
    targets: list[Target],
    concurrencies: list[int],
    rounds: int,
    duration_s: float,
    workdir: Path,
    log: Callable[[str], None] = print,
) -> list[Series]:
    series = [Series(t) for t in targets]
    for round_index in range(rounds):
        for concurrency in concurrencies:
            for s in series:
                point = measure(s.target, concurrency, duration_s, workdir)
                s.points.setdefault(concurrency, []).append(point)
                log(
                    f"  round {round_index + 1}/{rounds} c={concurrency:<3} {s.target.label:<40} "
                    f"{point.result.requests_per_s:8.0f} req/s  p50 {point.result.p50_ms:6.2f} ms"
                    f"  p99 {point.result.p99_ms:6.2f} ms  errors {point.result.errors_total}"
                    f"{'  (noisy)' if point.noisy else ''}"
                )
    return series
