"""benchmarks/wrk.py against a real ``python -m service``: the driver's numbers must be the
server's.

One server (a tiny real ONNX model) for the whole module, loaded for about 3 s in all: a valid
JSON body for 1 s (also the CPU measurement), an invalid body and a binary body for 0.5 s each
(also the fractional-duration path). The tests that need wrk are skipped, with the reason, when
it is missing; the argument checks run everywhere.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import RunningServer, running_server
from tiny_onnx import FEATURES, tiny_repository

from benchmarks.wrk import (
    WrkResult,
    _lua_string,
    process_cpu_seconds,
    run_wrk,
    wrk_available,
)

WRK_MISSING = wrk_available()
needs_wrk = pytest.mark.skipif(WRK_MISSING is not None, reason=WRK_MISSING or "")

MODEL = "tiny"
CONNECTIONS = 2
ROWS = 2
JSON_BODY = json.dumps(
    {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [ROWS, FEATURES],
                "data": [float(i) for i in range(ROWS * FEATURES)],
            }
        ]
    }
).encode()


@dataclass(frozen=True)
class LoadedRun:
    result: WrkResult
    successes: float  # growth of the server's 200 counter for the model during the run
    cpu_s: float  # growth of process_cpu_seconds(server pid) during the run


def _infer_url(server: RunningServer) -> str:
    return f"{server.http_url}/v2/models/{MODEL}/infer"


def _served_requests(server: RunningServer, status: str) -> float:
    """The server's normserve_requests_total for the tiny model over V2 with ``status``."""
    text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "normserve_requests_total" and sample.labels == {
                "model": MODEL,
                "protocol": "v2",
                "status": status,
            }:
                return sample.value
    return 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("wrk-server")
    # No access log: one log line per request would cost the server more than inference.
    with running_server(tiny_repository(root), root, "--access-log", "false") as srv:
        response = httpx.post(_infer_url(srv), content=JSON_BODY, timeout=10)
        assert response.status_code == 200, response.text
        yield srv


@pytest.fixture(scope="module")
def loaded(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> LoadedRun:
    """1 s of valid JSON requests, with the server's own counters and CPU around it."""
    successes_before = _served_requests(server, "200")
    cpu_before = process_cpu_seconds(server.proc.pid)
    result = run_wrk(
        _infer_url(server),
        JSON_BODY,
        content_type="application/json",
        connections=CONNECTIONS,
        duration_s=1,
        workdir=tmp_path_factory.mktemp("wrk-json"),
    )
    cpu_after = process_cpu_seconds(server.proc.pid)
    successes = _served_requests(server, "200") - successes_before
    print(f"valid JSON: {result.to_dict()}; server CPU {cpu_after - cpu_before:.2f} s")
    return LoadedRun(result, successes, cpu_after - cpu_before)


@needs_wrk
def test_counts_the_requests_the_server_answered(loaded: LoadedRun) -> None:
    result = loaded.result
    assert (result.connections, result.threads) == (CONNECTIONS, 2)
    assert result.requests > 0
    assert result.requests_per_s > 0
    assert result.requests_per_s == pytest.approx(result.requests / result.duration_s)
    assert 0.9 <= result.duration_s <= 1.5, result
    assert result.errors_total == 0, result
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms <= result.p999_ms <= result.max_ms
    assert 0 < result.mean_ms <= result.max_ms
    # Every response wrk counted was counted by the server as a success; the server may also
    # have answered the requests still in flight when wrk stopped (one per connection at most).
    assert result.requests - CONNECTIONS <= loaded.successes <= result.requests + CONNECTIONS
    data = result.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["errors_total"] == 0
    assert data["errors"] == {"connect": 0, "read": 0, "write": 0, "timeout": 0, "status": 0}


@needs_wrk
def test_server_cpu_grows_during_the_run(loaded: LoadedRun) -> None:
    assert loaded.cpu_s > 0.05, loaded


@needs_wrk
def test_error_statuses_are_counted(server: RunningServer, tmp_path: Path) -> None:
    # FEATURES + 1 columns: the server answers 400 to every request.
    wrong_shape = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, FEATURES + 1],
                    "data": [0.0] * (FEATURES + 1),
                }
            ]
        }
    ).encode()
    assert httpx.post(_infer_url(server), content=wrong_shape, timeout=10).status_code == 400
    result = run_wrk(
        _infer_url(server),
        wrong_shape,
        content_type="application/json",
        connections=CONNECTIONS,
        duration_s=0.5,
        workdir=tmp_path,
    )
    print(f"invalid JSON: {result.to_dict()}")
    assert result.requests > 0
    assert result.errors.status == result.requests, result
    assert result.errors_total == result.errors.status, result


@needs_wrk
def test_several_bodies_are_sent_in_turn(server: RunningServer, tmp_path: Path) -> None:
    """A valid body and one the server refuses (400), in turn: about half the answers are
    errors (each wrk thread cycles on its own, so the halves differ by a few at most)."""
    refused = JSON_BODY.replace(b'"shape": [2, 4]', b'"shape": [4, 2]')
    assert httpx.post(_infer_url(server), content=refused, timeout=10).status_code == 400
    result = run_wrk(
        _infer_url(server),
        [JSON_BODY, refused],
        content_type="application/json",
        connections=CONNECTIONS,
        duration_s=0.5,
        workdir=tmp_path,
    )
    assert result.requests > 10, result
    assert abs(2 * result.errors.status - result.requests) <= 2 * CONNECTIONS, result


@needs_wrk
def test_binary_tensor_extension_and_fractional_duration(
    server: RunningServer, tmp_path: Path
) -> None:
    values = [float(i) / 7 for i in range(ROWS * FEATURES)]
    tensor = struct.pack(f"<{len(values)}f", *values)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [ROWS, FEATURES],
                    "parameters": {"binary_data_size": len(tensor)},
                }
            ]
        }
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))}
    body = header + tensor
    successes_before = _served_requests(server, "200")
    result = run_wrk(
        _infer_url(server),
        body,
        content_type="application/octet-stream",
        headers=headers,
        connections=CONNECTIONS,
        duration_s=0.5,
        workdir=tmp_path,
    )
    successes = _served_requests(server, "200") - successes_before
    print(f"binary: {result.to_dict()}")
    assert result.requests > 0
    assert result.errors_total == 0, result
    assert result.requests - CONNECTIONS <= successes <= result.requests + CONNECTIONS
    # wrk's -d is whole seconds: 0.5 s runs as -d 1s cut short by SIGINT. wrk stops at its
    # next 100 ms tick, so the run lasts 0.5 to 0.6 s (more on a busy machine), never 1 s.
    assert 0.45 <= result.duration_s <= 0.9, result
    # The files are kept under content-hashed names for a rerun by hand.
    assert [p.read_bytes() for p in tmp_path.glob("wrk-body-*.bin")] == [body]


@needs_wrk
def test_stop_event_ends_the_run_early(server: RunningServer, tmp_path: Path) -> None:
    """A run bounded at 30 s ends when another thread sets ``stop``, with its counts."""
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    try:
        result = run_wrk(
            _infer_url(server),
            JSON_BODY,
            content_type="application/json",
            connections=CONNECTIONS,
            duration_s=30,
            workdir=tmp_path,
            stop=stop,
        )
    finally:
        timer.cancel()
    assert stop.is_set()
    assert result.requests > 0 and result.errors_total == 0, result
    assert result.duration_s < 30, result  # wrk ran to its bound: stop was not honoured


@needs_wrk
def test_wrk_failure_is_a_clear_error(tmp_path: Path) -> None:
    # Port 1 on loopback: nothing listens there, wrk gives up before loading anything.
    with pytest.raises(RuntimeError, match="unable to connect"):
        run_wrk(
            "http://127.0.0.1:1/v2/models/tiny/infer",
            JSON_BODY,
            content_type="application/json",
            connections=1,
            duration_s=1,
            workdir=tmp_path,
        )


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:8000/v2/models/tiny/infer",
        "http://example.com/",
        "http://127.0.0.1@example.com/",  # userinfo that looks like loopback
        "ftp://127.0.0.1/",
    ],
)
def test_refuses_anything_but_loopback(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"loopback|http"):
        run_wrk(url, b"{}", content_type="application/json", connections=1, duration_s=1,
                workdir=tmp_path / "work")  # fmt: skip
    assert not (tmp_path / "work").exists()  # refused before anything was written or run


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"connections": 0}, "connections"),
        ({"connections": 1, "threads": 2}, "threads"),
        ({"duration_s": 0.0}, "duration_s"),
        ({"duration_s": float("inf")}, "duration_s"),
        ({"timeout_s": -1.0}, "timeout_s"),
        ({"headers": {"X-Evil": "a\r\nHost: other"}}, "header value"),
        ({"headers": {"Bad Name": "1"}}, "header name"),
        ({"headers": {"Content-Length": "1"}}, "set by run_wrk"),
        ({"headers": {"content-type": "text/plain"}}, "set by run_wrk"),
    ],
)
def test_refuses_impossible_settings(
    kwargs: dict[str, object], message: str, tmp_path: Path
) -> None:
    settings: dict[str, object] = {"connections": 2, "duration_s": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        run_wrk(
            "http://127.0.0.1:8000/",
            b"{}",
            content_type="application/json",
            workdir=tmp_path,
            **settings,  # type: ignore[arg-type]
        )


def test_lua_literals_escape_every_unusual_byte() -> None:
    assert _lua_string('a"b\\c\n') == '"a\\034b\\092c\\010"'
    # Always three digits, so that a digit after an escape never becomes part of it.
    assert _lua_string(b"\x011") == '"\\0011"'
    assert _lua_string("é") == '"\\195\\169"'
