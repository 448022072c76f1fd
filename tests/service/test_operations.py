"""Operations against real servers: overload over HTTP, several workers, hostile bodies."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
from servers import running_server

from benchmarks.procs import descendants
from models.data import load_digits_split
from service.settings import auto_workers, cpu_budget

ROUNDS = 5  # bounded retries for the load-dependent overload test
CONCURRENT = 96


def _body(images: np.ndarray) -> bytes:
    return orjson.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": list(images.shape),
                    "data": images.ravel().tolist(),
                }
            ]
        }
    )


def test_overload_gets_503_retry_after_and_accepted_requests_are_right(
    built_repository: tuple[Path, Path, str], tmp_path: Path
) -> None:
    repository = built_repository[0]
    images = load_digits_split().test.images[:64].numpy()
    session = ort.InferenceSession(str(repository / "digits_transformer" / "1" / "model.onnx"))
    reference = session.run(None, {"image": images})[0]
    body = _body(images)

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post("/v2/models/digits_transformer/infer", content=body)
                    for _ in range(CONCURRENT)
                )
            )

    with running_server(
        repository, tmp_path, "--max-queue-size", "1", "--access-log", "false"
    ) as srv:
        refused = 0
        for _ in range(ROUNDS):
            responses = asyncio.run(burst(srv.http_url))
            for response in responses:
                assert response.status_code in (200, 503), response.text
                if response.status_code == 503:
                    refused += 1
                    assert int(response.headers["retry-after"]) >= 1
                    assert "overloaded" in response.json()["error"]
                else:
                    (out,) = response.json()["outputs"]
                    got = np.asarray(out["data"], np.float32).reshape(out["shape"])
                    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5)
            if refused:
                break
        assert refused, f"{ROUNDS} bursts of {CONCURRENT} never filled a queue of 1"
        metrics = httpx.get(f"{srv.http_url}/metrics").text
        assert 'status="503"' in metrics


@pytest.mark.skipif(auto_workers() < 2, reason="one CPU available: the default is one worker")
def test_default_workers_split_the_cpu_budget_and_share_one_metrics_and_stats_view(
    built_repository: tuple[Path, Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default, workers=auto: one worker per CPU here (tests/conftest.py pins 1 elsewhere).
    monkeypatch.delenv("NORMSERVE_WORKERS")
    workers = auto_workers()
    repository = built_repository[0]
    shared = tmp_path / "metrics"
    shared.mkdir()
    (shared / "counter_999999.db").write_bytes(b"stale values of an earlier run")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    requests = 24
    with running_server(repository, tmp_path) as srv:
        # Forked from the supervisor once it has imported the server (service.__main__),
        # not spawned as fresh interpreters: the same command line as the supervisor's.
        own = Path(f"/proc/{srv.proc.pid}/cmdline").read_bytes()
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in descendants(srv.proc.pid)]
        assert commands.count(own) == workers, commands
        assert not any(b"spawn_main" in c for c in commands), commands
        config = httpx.get(f"{srv.http_url}/v2/models/digits_cnn/config").json()
        threads = int(config["parameters"]["intra_op_thread_count"]["string_value"])
        assert threads == cpu_budget() // workers
        image = load_digits_split().test.images[:1].numpy().reshape(1, 1, 8, 8)
        for _ in range(requests):  # a new connection each: the workers share them out
            response = httpx.post(
                f"{srv.http_url}/v2/models/digits_cnn/infer", content=_body(image)
            )
            assert response.status_code == 200
        # Whichever worker answers a scrape, it reports the whole server's count.
        line = 'normserve_requests_total{model="digits_cnn",protocol="v2",status="200"}'
        for _ in range(6):
            text = httpx.get(f"{srv.http_url}/metrics").text
            counts = [float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)]
            assert counts == [requests], text[-2000:]
            assert 'normserve_model_ready{model="digits_cnn"} 1.0' in text
            # Triton's statistics too: every worker's requests, whichever worker answers.
            stats = httpx.get(f"{srv.http_url}/v2/models/digits_cnn/stats").json()
            entry = stats["model_stats"][0]
            assert entry["inference_stats"]["success"]["count"] == requests, entry
            assert entry["inference_count"] == requests, entry  # one row per request
            # Triton's compute counts: per request that ran, summed over the workers too.
            phases = entry["inference_stats"]
            assert phases["compute_input"]["count"] == requests, entry
            assert phases["compute_output"]["count"] == phases["compute_infer"]["count"], entry
            batches = sum(b["compute_infer"]["count"] for b in entry["batch_stats"])
            assert batches == entry["execution_count"] >= 1, entry
        writers = {f.stem.rsplit("_", 1)[-1] for f in shared.glob("counter_*.db")}
        assert len(writers) == workers and "999999" not in writers  # all; the stale file gone


def test_server_writes_no_onnxruntime_telemetry(
    built_repository: tuple[Path, Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime 1.32 writes a device ID and a multi-MB event store under ~/.cache unless
    ORT_DISABLE_TELEMETRY is set; the service sets it, so a server leaves the home alone."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    with running_server(built_repository[0], tmp_path) as srv:
        image = load_digits_split().test.images[:1].numpy().reshape(1, 1, 8, 8)
        response = httpx.post(f"{srv.http_url}/v2/models/digits_cnn/infer", content=_body(image))
        assert response.status_code == 200
    written = [str(p.relative_to(home)) for p in home.rglob("*")]
    assert written == [], f"the server wrote into $HOME: {written}"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"null",
        b"[]",
        b'{"inputs": null}',
        b'{"inputs": [{}]}',
        b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": "x", "data": []}]}',
        b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1,1,8,8], "data": "abc"}]}',
        b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [-1,1,8,8], "data": []}]}',
        b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1e9,1e9], "data": [1]}]}',
        b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1,1,8,8], '
        b'"parameters": {"binary_data_size": 256}}]}',
        b"\xff\xfe garbage",
    ],
)
def test_hostile_bodies_get_a_4xx_never_a_500(server: object, body: bytes) -> None:
    url = server.http_url  # type: ignore[attr-defined]
    response = httpx.post(f"{url}/v2/models/digits_cnn/infer", content=body)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]
    # A bad Inference-Header-Content-Length is the client's error too.
    response = httpx.post(
        f"{url}/v2/models/digits_cnn/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(len(body) + 10)},
    )
    assert 400 <= response.status_code < 500, response.text
