"""Goodput under overload: what a small queue does when far more clients send than it holds.

One server with ``--max-queue-size 8``; wrk posts the one-sample V2 JSON request from
OVERLOAD_CONNECTIONS keep-alive connections in interleaved rounds. Goodput is the answers
that were 200 per second; the rest were refused (503 + Retry-After) and wrk, like a hostile
or naive client, sends again at once. The goal (protocol-core issue): goodput at the most
connections stays at least 0.8 of goodput at the fewest, i.e. refusals do not eat the
server's capacity to answer.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.serving import Body, running_normserve
from benchmarks.wrk import run_wrk

QUEUE_SIZE = 8
OVERLOAD_CONNECTIONS = (32, 256)
GOODPUT_FLOOR = 0.8


def overload_benchmark(
    repository: Path,
    body: Body,
    rounds: int,
    duration_s: float,
    work: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Per connection count: median goodput, refusals and p99 over ``rounds``; and the ratio
    of goodput at the most connections to goodput at the fewest."""
    settings = {"NORMSERVE_MAX_QUEUE_SIZE": str(QUEUE_SIZE)}
    samples: dict[int, list[dict[str, float]]] = {c: [] for c in OVERLOAD_CONNECTIONS}
    with running_normserve("normserve-queue8", repository, body, work, settings) as server:
        log(
            f"overload: --max-queue-size {QUEUE_SIZE}, connections {OVERLOAD_CONNECTIONS}, "
            f"{rounds} rounds × {duration_s:.0f} s"
        )
        for r in range(rounds):
            order = OVERLOAD_CONNECTIONS if r % 2 == 0 else OVERLOAD_CONNECTIONS[::-1]
            for connections in order:
                w = run_wrk(
                    server.url + body.path,
                    body.content,
                    content_type=body.content_type,
                    headers=body.headers,
                    connections=connections,
                    duration_s=duration_s,
                    workdir=work,
                )
                refused = w.errors.status
                samples[connections].append(
                    {
                        "goodput_per_s": (w.requests - refused) / w.duration_s,
                        "refused_per_s": refused / w.duration_s,
                        "p99_ms": w.p99_ms,
                        "socket_errors": w.errors_total - refused,
                    }
                )
    rows = [
        {
            "connections": c,
            **{k: statistics.median(s[k] for s in samples[c]) for k in samples[c][0]},
        }
        for c in OVERLOAD_CONNECTIONS
    ]
    few, most = rows[0]["goodput_per_s"], rows[-1]["goodput_per_s"]
    return {
        "queue_size": QUEUE_SIZE,
        "format": body.format,
        "rows": rows,
        "goodput_ratio": most / few if few else float("nan"),
        "floor": GOODPUT_FLOOR,
    }
