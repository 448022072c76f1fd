"""``python -m benchmarks.rehearse``: scale-out rehearsed on one machine, as an orchestrator does.

Three replicas of ``python -m service``, each in its own network namespace
(benchmarks/netns.py), behind HAProxy health-checking ``/v2/health/ready``
(benchmarks/haproxy.py), under constant load from wrk through the load balancer. Then:

1. rolling restart: one replica at a time SIGTERM (readiness 503 at once, the listener closed
   ``DRAIN_DELAY_S`` later, in-flight requests finished), wait for its exit, start it again,
   wait until HAProxy has it UP; then the next. Expected: no failed request.
2. ``kill -9`` of one replica: at most the requests in flight on it may fail (HAProxy retries
   those it can); measured: how long until HAProxy marks it DOWN, and that no request is
   sent to it afterwards. Then it is started again.
3. a replica restarted on a repository with a corrupted model file: it is live but never
   ready, and HAProxy never sends it a request; the others serve everything.

Prints the counts of each phase (requests, non-2xx answers, socket errors). Needs root
(network namespaces), iproute2, haproxy and wrk: ``make rehearse``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks import haproxy, netns
from benchmarks.procs import free_port
from benchmarks.wrk import WrkResult, run_wrk, wrk_available

REPLICAS = 3
# Above HAProxy's FALL x CHECK_INTERVAL_MS (400 ms) plus a check's round trip: the replica is
# out of rotation before its listener closes.
DRAIN_DELAY_S = 1.0
GRACEFUL_SHUTDOWN_S = 10.0
CONNECTIONS = 8
MODEL = "digits_cnn"
START_WITHIN_S = 60.0
OBSERVE_S = 3.0  # how long a killed or broken replica is watched before it is replaced
# The load lasts as long as each phase does (wrk is stopped when it is over); this bounds it.
LOAD_BOUND_S = 60.0


def unavailable() -> str | None:
    """Why the rehearsal cannot run here (for skips and messages), or None."""
    return netns.unavailable() or haproxy.unavailable() or wrk_available()


def infer_body(repository: Path, model: str = MODEL) -> bytes:
    """One V2 JSON request for ``model``: a single sample of its declared input, all 0.5."""
    spec = json.loads((repository / model / "config.json").read_text())["inputs"][0]
    shape = [1 if dim == -1 else dim for dim in spec["shape"]]
    count = 1
    for dim in shape:
        count *= dim
    tensor = {"name": spec["name"], "datatype": spec["datatype"], "shape": shape}
    return json.dumps({"inputs": [{**tensor, "data": [0.5] * count}]}).encode()


def corrupt_copy(repository: Path, into: Path, model: str = MODEL) -> Path:
    """A copy of ``repository`` in which one byte of ``model``'s ONNX file is flipped (bit rot:
    the checksum recorded in its config.json no longer matches)."""
    shutil.copytree(repository, into, ignore=shutil.ignore_patterns("_web"))
    path = next((into / model).glob("*/model.onnx"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return into


@dataclass
class Phase:
    name: str
    requests: int = 0  # complete responses, any status
    non_2xx: int = 0
    socket_errors: int = 0  # connect, read, write and timeout errors
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return self.non_2xx + self.socket_errors

    def line(self) -> str:
        notes = ", ".join(f"{k} {v}" for k, v in self.notes.items())
        return (
            f"{self.name}: {self.requests} requests, {self.non_2xx} non-2xx, "
            f"{self.socket_errors} socket errors" + (f"; {notes}" if notes else "")
        )


class Rehearsal:
    """The replicas, the load balancer and the load; ``close()`` removes all of it."""

    def __init__(
        self,
        repository: Path,
        workdir: Path,
        drain_delay_s: float = DRAIN_DELAY_S,
        lb_retries: bool = True,
    ) -> None:
        self.repository = repository
        self.workdir = workdir
        self.drain_delay_s = drain_delay_s
        self.body = infer_body(repository)
        args = ("--drain-delay-s", str(drain_delay_s),
                "--graceful-shutdown-s", str(GRACEFUL_SHUTDOWN_S))  # fmt: skip
        self.cluster = netns.Cluster(REPLICAS, workdir / "logs", args)
        self.lb: haproxy.HAProxy | None = None
        try:
            for i in range(REPLICAS):
                self.cluster.start(i, repository)
            # HAProxy starts its servers UP (to be taken out by failed checks): it starts
            # only once every replica is ready, so no request meets one still loading.
            for replica in self.cluster.replicas:
                _wait_answer(f"{replica.url}/v2/health/ready", replica.running, want=200)
            servers = [(self.name(r.index), f"{r.address}:{netns.SERVER_PORT}")
                       for r in self.cluster.replicas]  # fmt: skip
            self.lb = haproxy.HAProxy(free_port(), servers, workdir / "haproxy", lb_retries)
            for i in range(REPLICAS):
                self.wait_up(i)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def name(index: int) -> str:
        return f"replica{index}"

    @property
    def balancer(self) -> haproxy.HAProxy:
        assert self.lb is not None
        return self.lb

    def wait_up(self, index: int) -> float:
        """Seconds until HAProxy has replica ``index`` UP (its readiness checks passed)."""
        started = time.monotonic()
        replica = self.cluster.replicas[index]
        while not self.balancer.stats()[self.name(index)].up:
            if not replica.running():
                raise RuntimeError(f"replica {index} exited:\n{replica.log_tail()}")
            if time.monotonic() - started > START_WITHIN_S:
                raise TimeoutError(f"replica {index} not UP:\n{replica.log_tail()}")
            time.sleep(0.02)
        return time.monotonic() - started

    @contextmanager
    def load(self, phase: Phase, bound_s: float) -> Iterator[None]:
        """wrk through HAProxy while the body of the ``with`` runs (at most ``bound_s``)."""
        outcome: list[WrkResult | BaseException] = []
        stop = threading.Event()

        def drive() -> None:
            try:
                result = run_wrk(
                    f"{self.balancer.url}/v2/models/{MODEL}/infer",
                    self.body,
                    content_type="application/json",
                    connections=CONNECTIONS,
                    threads=1,
                    duration_s=bound_s,
                    timeout_s=5,
                    workdir=self.workdir / "wrk",
                    stop=stop,
                )
                outcome.append(result)
            except BaseException as exc:  # reported in the main thread
                outcome.append(exc)

        before = self.balancer.stats()
        thread = threading.Thread(target=drive, name=f"wrk-{phase.name}")
        thread.start()
        time.sleep(0.5)  # the load is on before anything happens
        try:
            yield
            phase.notes["load covered it"] = thread.is_alive()
        finally:
            stop.set()
            thread.join()
        (result,) = outcome
        if isinstance(result, BaseException):
            raise result
        after = self.balancer.stats()
        # Requests that met a closed port or a dead replica and were sent again (0 when every
        # replica left the rotation before its listener closed).
        phase.notes["HAProxy retries"] = sum(after[n].retries - before[n].retries for n in after)
        errors = result.errors
        phase.requests = result.requests
        phase.non_2xx = errors.status
        phase.socket_errors = errors.connect + errors.read + errors.write + errors.timeout

    def rolling_restart(self) -> Phase:
        phase = Phase("rolling restart")
        with self.load(phase, REPLICAS * LOAD_BOUND_S):
            for i in range(REPLICAS):
                self.cluster.signal(i, signal.SIGTERM)
                code = self.cluster.wait_exit(i, self.drain_delay_s + GRACEFUL_SHUTDOWN_S + 5)
                if code != 0:
                    log = self.cluster.replicas[i].log_tail()
                    raise RuntimeError(f"replica {i} exited {code} after SIGTERM:\n{log}")
                # Out of rotation before it comes back, so that "UP" below is the new process.
                self.balancer.wait_status(self.name(i), up=False, timeout_s=10)
                self.cluster.start(i, self.repository)
                phase.notes[f"replica {i} back UP after (s)"] = round(self.wait_up(i), 2)
        return phase

    def kill_one(self, index: int = 1) -> Phase:
        phase = Phase("kill -9")
        name = self.name(index)
        with self.load(phase, LOAD_BOUND_S):
            in_flight = self.balancer.stats()[name].current
            self.cluster.signal(index, signal.SIGKILL)
            down_s = self.balancer.wait_status(name, up=False, timeout_s=10)
            at_down = self.balancer.stats()[name]
            time.sleep(OBSERVE_S)
            later = self.balancer.stats()[name]
            self.cluster.wait_exit(index, 10)
            self.cluster.start(index, self.repository)
            back_s = self.wait_up(index)
        phase.notes.update(
            {
                "in flight on it at the kill": in_flight,
                "marked DOWN after (ms)": round(down_s * 1000),
                "sent to it after DOWN": later.sessions - at_down.sessions,
                "back UP after restart (s)": round(back_s, 2),
                "check": f"every {haproxy.CHECK_INTERVAL_MS} ms, fall {haproxy.FALL}",
            }
        )
        return phase

    def corrupted_replica(self, index: int = 2) -> Phase:
        phase = Phase("corrupted model")
        name = self.name(index)
        broken = corrupt_copy(self.repository, self.workdir / "corrupted")
        replica = self.cluster.replicas[index]
        with self.load(phase, LOAD_BOUND_S):
            self.cluster.signal(index, signal.SIGTERM)
            self.cluster.wait_exit(index, self.drain_delay_s + GRACEFUL_SHUTDOWN_S + 5)
            self.balancer.wait_status(name, up=False, timeout_s=10)
            before = self.balancer.stats()[name].sessions
            self.cluster.start(index, broken)
            live = _wait_answer(f"{replica.url}/v2/health/live", replica.running)
            time.sleep(OBSERVE_S)  # many check intervals
            ready = httpx.get(f"{replica.url}/v2/health/ready", timeout=5).status_code
            stats = self.balancer.stats()[name]
            self.cluster.signal(index, signal.SIGTERM)
            self.cluster.wait_exit(index, self.drain_delay_s + GRACEFUL_SHUTDOWN_S + 5)
        self.cluster.start(index, self.repository)  # the healthy version back, for what follows
        self.wait_up(index)
        phase.notes.update(
            {
                "live": live,
                "readiness": ready,
                "HAProxy status": stats.status,
                "sent to it": stats.sessions - before,
            }
        )
        return phase

    def close(self) -> None:
        try:
            if self.lb is not None:
                self.lb.close()
        finally:
            self.cluster.close()


def _wait_answer(url: str, running: Callable[[], bool], want: int | None = None) -> int:
    """The first HTTP status ``url`` answers (``want`` if given): its server's listener is up."""
    deadline = time.monotonic() + START_WITHIN_S
    while time.monotonic() < deadline:
        if not running():
            raise RuntimeError(f"the server behind {url} exited")
        try:
            status = httpx.get(url, timeout=2).status_code
            if want is None or status == want:
                return status
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {want or ''} within {START_WITHIN_S:.0f} s")


def rehearse(
    repository: Path, workdir: Path, drain_delay_s: float = DRAIN_DELAY_S, lb_retries: bool = True
) -> list[Phase]:
    rehearsal = Rehearsal(repository, workdir, drain_delay_s, lb_retries)
    try:
        return [rehearsal.rolling_restart(), rehearsal.kill_one(), rehearsal.corrupted_replica()]
    finally:
        rehearsal.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rehearse", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--json", action="store_true", help="the phases as one JSON document")
    parser.add_argument(
        "--drain-delay-s",
        type=float,
        default=DRAIN_DELAY_S,
        help="the replicas' --drain-delay-s (0 shows what the rolling restart costs without it)",
    )
    parser.add_argument(
        "--no-lb-retries",
        dest="lb_retries",
        action="store_false",
        help="HAProxy sends no request again: every failure reaches the client",
    )
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason is not None:
        print(f"cannot rehearse here: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="normserve-rehearse-") as work:
        phases = rehearse(
            args.repository.resolve(), Path(work), args.drain_delay_s, args.lb_retries
        )
    if args.json:
        print(json.dumps([{**asdict(p), "failed": p.failed} for p in phases], indent=2))
    else:
        print(
            f"{REPLICAS} replicas behind HAProxy, wrk with {CONNECTIONS} connections, "
            f"drain delay {args.drain_delay_s} s, HAProxy retries "
            f"{'on' if args.lb_retries else 'off'}:"
        )
        for phase in phases:
            print(f"  {phase.line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
