"""The app through Starlette's TestClient (lifespan runs): errors, readiness, limits, V1,
metrics."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from starlette.testclient import TestClient
from tiny_onnx import CLASSES, FEATURES, expected, tiny_repository

from service import collector
from service import settings as settings_module
from service.app import create_app
from service.settings import AUTO_WORKERS_MAX, Settings, auto_workers, cpu_budget

ATOL = 1e-5


def _client(repository: Path, **settings: object) -> TestClient:
    return TestClient(create_app(Settings(repository=repository, **settings)))


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return tiny_repository(tmp_path)


def _v2(x: np.ndarray, **extra: object) -> bytes:
    body = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ],
        **extra,
    }
    return orjson.dumps(body)


def test_v2_json_inference_and_metadata(repository: Path) -> None:
    x = np.arange(2 * FEATURES, dtype=np.float32).reshape(2, FEATURES)
    with _client(repository) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").json() == {"ready": True}
        meta = client.get("/v2/models/tiny").json()
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, FEATURES]}]
        assert meta["versions"] == ["1"]
        response = client.post("/v2/models/tiny/versions/1/infer", content=_v2(x, id="abc"))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["id"] == "abc" and body["model_version"] == "1"
        (out,) = body["outputs"]
        assert out["shape"] == [2, CLASSES] and out["datatype"] == "FP32"
        np.testing.assert_allclose(
            np.array(out["data"]).reshape(2, CLASSES), expected(x), atol=ATOL
        )
        assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (_v2(np.zeros((1, FEATURES + 1), np.float32)), 400, "expected shape [-1, 4]"),
        (_v2(np.zeros((FEATURES,), np.float32)), 400, "batch dimension is missing"),
        (_v2(np.zeros((9, FEATURES), np.float32)), 400, "exceeds the model's maximum 8"),
        (_v2(np.full((1, FEATURES), np.inf, np.float32)), 400, "must hold numbers, found null"),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {"name": "x", "datatype": "FP64", "shape": [1, 4], "data": [1, 2, 3, 4]}
                    ]
                }
            ),
            400,
            "expected datatype FP32, got FP64",
        ),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {"name": "y", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
                    ]
                }
            ),
            400,
            "no input(s) ['y']",
        ),
    ],
)
def test_bad_requests_get_400_with_a_precise_message(
    repository: Path, body: bytes, status: int, fragment: str
) -> None:
    with _client(repository) as client:
        response = client.post("/v2/models/tiny/infer", content=body)
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert fragment in response.json()["error"]


def test_non_finite_binary_input_is_refused_before_onnxruntime(repository: Path) -> None:
    x = np.zeros((2, FEATURES), np.float32)
    x[1, 2] = np.nan
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [2, FEATURES],
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    )
    with _client(repository) as client:
        response = client.post(
            "/v2/models/tiny/infer",
            content=header + x.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        assert response.status_code == 400
        assert "finite" in response.json()["error"] and "element 6" in response.json()["error"]


def test_unknown_things_get_404_json(repository: Path) -> None:
    with _client(repository) as client:
        for method, path in [
            ("post", "/v2/models/nope/infer"),
            ("get", "/v2/models/nope"),
            ("get", "/v2/models/tiny/versions/7"),
            ("get", "/no/such/route"),
            ("post", "/v1/models/nope:predict"),
        ]:
            response = (
                getattr(client, method)(path, content=b"{}")
                if method == "post"
                else client.get(path)
            )
            assert response.status_code == 404, path
            assert "error" in response.json(), path


def test_body_over_the_limit_is_413(repository: Path) -> None:
    with _client(repository, max_request_bytes=2048) as client:
        response = client.post("/v2/models/tiny/infer", content=b" " * 4096)
        assert response.status_code == 413
        assert "limit of 2048" in response.json()["error"]


def test_corrupt_model_fails_readiness_not_the_server(repository: Path) -> None:
    onnx_file = repository / "tiny" / "1" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with _client(repository) as client:
        assert client.get("/v2/health/live").status_code == 200
        ready = client.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json() == {"ready": False}
        response = client.post("/v2/models/tiny/infer", content=_v2(np.zeros((1, 4), np.float32)))
        assert response.status_code == 503 and "failed to load" in response.json()["error"]
        index = client.post("/v2/repository/index").json()
        assert index[0]["state"] == "UNAVAILABLE" and "sha256" in index[0]["reason"]


def test_v1_predict_returns_labels_and_probabilities(repository: Path) -> None:
    x = np.array([[1.0, 0.0, -1.0, 2.0]], dtype=np.float32)
    with _client(repository) as client:
        response = client.post("/v1/models/tiny:predict", json={"instances": x.tolist()})
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        logits = expected(x)[0]
        assert prediction["label"] == "abc"[int(np.argmax(logits))]
        assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-5
        np.testing.assert_allclose(prediction["logits"], logits, atol=ATOL)
        bad = client.post("/v1/models/tiny:predict", json={"instances": [["a", "b", "c", "d"]]})
        assert bad.status_code == 400 and "FP32" in bad.json()["error"]
        ragged = client.post("/v1/models/tiny:predict", json={"instances": [[1, 2], [1, 2, 3]]})
        assert ragged.status_code == 400 and "ragged" in ragged.json()["error"]
        assert client.get("/v1/models/tiny").json()["ready"] is True


def test_metrics_count_requests_by_status_without_inventing_labels(repository: Path) -> None:
    with _client(repository) as client:
        client.post("/v2/models/tiny/infer", content=_v2(np.zeros((3, 4), np.float32)))
        client.post("/v2/models/tiny/infer", content=b"{")
        client.post("/v2/models/made-up-name/infer", content=b"{}")
        text = client.get("/metrics").text
    assert 'normserve_requests_total{model="tiny",protocol="v2",status="200"} 1.0' in text
    assert 'normserve_requests_total{model="tiny",protocol="v2",status="400"} 1.0' in text
    assert 'model="made-up-name"' not in text and 'model="unknown"' in text
    assert 'normserve_batch_size_sum{model="tiny"} 3.0' in text


def test_auto_workers_is_one_per_cpu_each_with_one_thread() -> None:
    settings = Settings(workers="auto")  # type: ignore[arg-type]  # as the flag/env give it
    assert settings.workers == min(cpu_budget(), AUTO_WORKERS_MAX)
    assert settings.threads_per_session == max(1, cpu_budget() // settings.workers)


def test_workers_default_to_auto_and_to_one_in_explicit_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NORMSERVE_WORKERS")  # tests/conftest.py pins 1
    assert Settings().workers == auto_workers() == min(cpu_budget(), AUTO_WORKERS_MAX)
    assert Settings(workers=" AUTO ").workers == auto_workers()  # type: ignore[arg-type]
    # A load or unload request would reach one worker only: auto means one there, from a
    # flag or from the environment alike; a number asked for is still refused.
    assert Settings(model_control_mode="explicit").workers == 1
    monkeypatch.setenv("NORMSERVE_MODEL_CONTROL_MODE", "explicit")
    assert Settings().workers == 1
    if cpu_budget() > 1:
        with pytest.raises(ValueError, match="explicit needs workers=1"):
            Settings(workers=2)


def test_auto_workers_are_capped_on_a_large_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module, "cpu_budget", lambda: 64)
    monkeypatch.delenv("NORMSERVE_WORKERS")
    settings = Settings()
    assert (settings.workers, settings.threads_per_session) == (AUTO_WORKERS_MAX, 16)


def test_settings_refuse_more_threads_than_cpus() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        Settings(workers=1, intra_op_threads=10_000)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            orjson.dumps(
                {
                    "inputs": [
                        {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [[[[[1]]]]]}
                    ],
                    "parameters": {"a": {"b": {"c": {"d": {"e": {"f": {}}}}}}},
                }
            ),
            "nested deeper than 6 levels",
        ),
        (
            orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [4096, 4096]}]}),
            "declares 16777216 elements; the limit is 1000",
        ),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {"name": f"x{i}", "datatype": "FP32", "shape": [1], "data": [1]}
                        for i in range(5)
                    ]
                }
            ),
            "names 5 inputs and outputs; the limit is 4",
        ),
    ],
)
def test_request_limits_are_enforced_before_decoding(
    repository: Path, body: bytes, fragment: str
) -> None:
    with _client(repository, max_json_depth=6, max_tensor_elements=1000, max_tensors=4) as client:
        response = client.post("/v2/models/tiny/infer", content=body)
        assert response.status_code == 400
        assert fragment in response.json()["error"]


@pytest.mark.parametrize("name", ["..", ".hidden", "a b", "x" * 200, "ünï"])
def test_model_names_outside_the_allow_list_are_400(repository: Path, name: str) -> None:
    with _client(repository) as client:
        response = client.post(
            f"/v2/models/{name}/infer", content=_v2(np.zeros((1, 4), np.float32))
        )
        assert response.status_code in (400, 404), response.text
        assert response.json()["error"]
        if response.status_code == 400:
            assert "invalid model name" in response.json()["error"]


def test_inference_routes_keep_their_contract(repository: Path) -> None:
    """Versions, errors, other methods and the OpenAPI document behave as documented, and
    inference requests are counted in the metrics by protocol and status."""
    x = np.zeros((2, 4), np.float32)
    with _client(repository) as client:
        assert client.post("/v2/models/tiny/versions/1/infer", content=_v2(x)).status_code == 200
        missing = client.post("/v2/models/tiny/versions/9/infer", content=_v2(x))
        assert missing.status_code == 404 and "9" in missing.json()["error"]
        unknown = client.post("/v2/models/nothing/infer", content=_v2(x))
        assert unknown.status_code == 404 and "nothing" in unknown.json()["error"]
        assert client.get("/v2/models/tiny/infer").status_code == 405
        assert client.post("/v2/models/tiny/infer/extra", content=_v2(x)).status_code == 404
        v1 = client.post("/v1/models/tiny:predict", json={"instances": x.tolist()})
        assert v1.status_code == 200 and len(v1.json()["predictions"]) == 2
        assert client.post("/v1/models/nothing:predict", json={"instances": []}).status_code == 404
        paths = client.get("/openapi.json").json()["paths"]
        assert "/v1/models/{model_name}:predict" in paths
        assert "/v2/models/{model_name}/infer" in paths
        assert "/v2/models/{model_name}/versions/{version}/infer" in paths
        text = client.get("/metrics").text
    assert 'normserve_requests_total{model="tiny",protocol="v2",status="200"} 1.0' in text
    assert 'normserve_requests_total{model="tiny",protocol="v2",status="404"} 1.0' in text
    assert 'normserve_requests_total{model="tiny",protocol="v1",status="200"} 1.0' in text


def test_statistics_count_each_request_in_every_compute_phase(repository: Path) -> None:
    """Triton's definitions: compute_input, compute_infer and compute_output count every
    request that ran (perf_analyzer aborts when they differ: "Server side statistics compute
    counts must be the same"), batch_stats count batches; the phases and the queue are parts
    of the requests' own durations."""
    x = np.ones((2, FEATURES), np.float32)
    with _client(repository) as client:
        for _ in range(3):
            assert client.post("/v2/models/tiny/infer", content=_v2(x)).status_code == 200
        (entry,) = client.get("/v2/models/tiny/stats").json()["model_stats"]
    phases = entry["inference_stats"]
    names = ("compute_input", "compute_infer", "compute_output")
    assert {phases[p]["count"] for p in names} == {3} == {phases["success"]["count"]}
    assert phases["queue"]["count"] == 3
    # Measured, not filled in: decoding, onnxruntime and encoding each take some time.
    assert all(phases[p]["ns"] > 0 for p in names)
    parts = phases["queue"]["ns"] + sum(phases[p]["ns"] for p in names)
    assert parts <= phases["success"]["ns"]
    assert entry["inference_count"] == 6
    for batch in entry["batch_stats"]:
        assert len({batch[p]["count"] for p in names}) == 1 and batch["compute_infer"]["count"]
    assert (
        sum(b["compute_infer"]["count"] for b in entry["batch_stats"]) == entry["execution_count"]
    )


def test_start_up_leaves_its_heap_out_of_the_collectors_passes(repository: Path) -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        with _client(repository) as client:
            assert client.get("/v2/health/ready").status_code == 200
            # The modules, sessions and tables start-up made: frozen once ready.
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


@pytest.fixture
def held_collector() -> Iterator[None]:
    """The garbage collector as ``python -m service`` leaves it for the app: held."""
    collector.hold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.enable()


@pytest.mark.usefixtures("held_collector")
def test_start_up_resumes_the_held_collector_with_what_it_built_frozen(repository: Path) -> None:
    """Held during start-up (service.collector), the collector must run again once the app
    has started, or the server would never free a cycle."""
    with _client(repository) as client:
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
        assert client.get("/v2/health/ready").json() == {"ready": True}


@pytest.mark.usefixtures("held_collector")
def test_a_failed_start_up_resumes_the_held_collector(repository: Path) -> None:
    onnx_file = repository / "tiny" / "1" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    app = create_app(Settings(repository=repository, strict_models=True))
    sent: list[str] = []

    # The lifespan driven by hand: TestClient does not return from a failed start-up.
    async def receive() -> dict[str, str]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, str]) -> None:
        sent.append(message["type"])

    asyncio.run(app({"type": "lifespan", "state": {}}, receive, send))
    assert sent == ["lifespan.startup.failed"]
    assert gc.isenabled()
