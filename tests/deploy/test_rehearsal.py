"""Scale-out rehearsed: 3 replicas in network namespaces behind HAProxy, under wrk's load.

The real thing on one machine (benchmarks/rehearse.py; ``make rehearse`` prints the same
counts): ``python -m service`` processes, each in its own network namespace with a veth pair
to the root namespace, HAProxy from Debian health-checking ``/v2/health/ready``, wrk through
HAProxy. Asserted:

- a rolling restart (SIGTERM, drain, start, UP; one replica at a time) fails no request;
- ``kill -9`` of one replica fails at most the requests that were in flight on it, HAProxy
  marks it DOWN and sends it nothing afterwards;
- a replica started on a repository with a corrupted model is live, never ready, never UP
  and gets no request, while the others answer everything.

SKIPPED with the reason without root, iproute2, haproxy or wrk. Everything it creates
(processes by PID, veth links, namespaces) is removed even when an assertion fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import rehearse
from benchmarks.netns import ip
from benchmarks.rehearse import CONNECTIONS, Phase, Rehearsal

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def phases(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Phase]]:
    """The three phases, run once in order against the session's built repository."""
    reason = rehearse.unavailable()
    if reason is not None:
        pytest.skip(reason)
    # Only now: where the rehearsal cannot run, the skip costs no repository build.
    repository: Path = request.getfixturevalue("built_repository")[0]
    namespaces_before = ip("netns", "list").stdout
    rehearsal = Rehearsal(repository, tmp_path_factory.mktemp("rehearsal"))
    try:
        done = [rehearsal.rolling_restart(), rehearsal.kill_one(), rehearsal.corrupted_replica()]
    finally:
        rehearsal.close()
    for phase in done:
        print(phase.line())
    # Nothing left behind: no namespace of ours, no process (close() waited for each PID).
    assert ip("netns", "list").stdout == namespaces_before
    assert rehearsal.cluster.replicas == []
    assert rehearsal.balancer.proc.poll() is not None
    yield {phase.name: phase for phase in done}


def covered(phase: Phase) -> None:
    assert phase.notes["load covered it"], f"wrk stopped before {phase.name} was over"
    assert phase.requests > 0


def test_rolling_restart_fails_no_request(phases: dict[str, Phase]) -> None:
    phase = phases["rolling restart"]
    covered(phase)
    assert (phase.non_2xx, phase.socket_errors) == (0, 0), phase.line()


def test_kill_9_fails_at_most_the_requests_in_flight_and_is_taken_out(
    phases: dict[str, Phase],
) -> None:
    phase = phases["kill -9"]
    covered(phase)
    # In flight on the killed replica: at most every connection wrk holds (HAProxy's own
    # count at the kill is in the notes); HAProxy retries those it can.
    assert phase.failed <= CONNECTIONS, phase.line()
    assert phase.notes["sent to it after DOWN"] == 0, phase.line()


def test_corrupted_replica_is_never_ready_and_gets_no_traffic(
    phases: dict[str, Phase],
) -> None:
    phase = phases["corrupted model"]
    covered(phase)
    assert phase.notes["live"] == 200 and phase.notes["readiness"] == 503, phase.line()
    assert phase.notes["HAProxy status"].startswith("DOWN"), phase.line()
    assert phase.notes["sent to it"] == 0, phase.line()
    assert (phase.non_2xx, phase.socket_errors) == (0, 0), phase.line()


def test_corruption_is_what_the_replica_refuses(
    built_repository: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """The corrupted copy differs from the original in exactly the model file's one byte."""
    original = built_repository[0] / rehearse.MODEL
    broken = rehearse.corrupt_copy(built_repository[0], tmp_path / "broken") / rehearse.MODEL
    (onnx,) = original.glob("*/model.onnx")
    changed = broken / onnx.relative_to(original)
    a, b = onnx.read_bytes(), changed.read_bytes()
    assert len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1
    assert (broken / "config.json").read_bytes() == (original / "config.json").read_bytes()
