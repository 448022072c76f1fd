"""The small conventions Triton's and KServe's clients rely on, against a real server.

Triton's examples check that an unknown model's error starts with "Request for unknown
model" (and it must not list the other models); KServe's SDK checks V1 liveness with
``GET /`` (``{"status": "alive"}``), lists models with ``GET /v1/models`` and parses V2
answers with response models that require ``id``. KServe's own REST client runs where the
``kserve`` package is installed (it is not a project dependency: it would pull in the
Kubernetes client and pandas), and is skipped with that reason elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from servers import RunningServer, running_server
from tiny_onnx import FEATURES, expected, tiny_repository


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("conventions")
    with running_server(tiny_repository(root), root) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        yield client


def v2_body(request_id: str | None = None) -> bytes:
    x = np.ones((1, FEATURES), np.float32)
    document: dict[str, Any] = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, FEATURES], "data": [1] * 4}]
    }
    if request_id is not None:
        document["id"] = request_id
    assert x.size == FEATURES
    return orjson.dumps(document)


def test_root_answers_liveness_to_clients_and_the_page_to_browsers(http: httpx.Client) -> None:
    assert http.get("/", headers={"Accept": "application/json"}).json() == {"status": "alive"}
    assert http.get("/", headers={"Accept": "*/*"}).json() == {"status": "alive"}
    page = http.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_v1_models_lists_the_served_models(http: httpx.Client) -> None:
    response = http.get("/v1/models")
    assert response.status_code == 200 and response.json() == {"models": ["tiny"]}


UNKNOWN = [
    ("GET", "/v2/models/nothere"),
    ("GET", "/v2/models/nothere/ready"),
    ("GET", "/v2/models/nothere/config"),
    ("GET", "/v2/models/nothere/stats"),
    ("POST", "/v2/models/nothere/infer"),
    ("GET", "/v2/models/nothere/versions/1"),
    ("POST", "/v2/models/nothere/versions/1/infer"),
    ("GET", "/v1/models/nothere"),
    ("POST", "/v1/models/nothere:predict"),
]


@pytest.mark.parametrize(("method", "path"), UNKNOWN, ids=[f"{m} {p}" for m, p in UNKNOWN])
def test_unknown_model_is_worded_as_triton_words_it(
    http: httpx.Client, method: str, path: str
) -> None:
    response = http.request(method, path, content=v2_body() if method == "POST" else None)
    assert response.status_code == 404, response.text
    message = response.json()["error"]
    assert message == "Request for unknown model: 'nothere' is not found"
    assert "tiny" not in response.text  # the other models are nobody's business


def test_unknown_version_of_a_known_model(http: httpx.Client) -> None:
    response = http.get("/v2/models/tiny/versions/7")
    assert response.status_code == 404
    assert response.json()["error"].startswith("Request for unknown model: 'tiny' version '7'")


def test_every_inference_answer_has_an_id(http: httpx.Client) -> None:
    given = http.post("/v2/models/tiny/infer", content=v2_body("q-17")).json()
    assert given["id"] == "q-17"
    made = http.post("/v2/models/tiny/infer", content=v2_body(), headers={"X-Request-ID": "r-9"})
    assert made.json()["id"] == "r-9"  # the request's own id, as in the access log
    anonymous = http.post("/v2/models/tiny/infer", content=v2_body())
    assert isinstance(anonymous.json()["id"], str) and anonymous.json()["id"]
    assert anonymous.json()["id"] == anonymous.headers["x-request-id"]


# Run in a child process: kserve registers its generated ``inference.*`` gRPC messages in
# protobuf's default pool on import, as tritonclient.grpc does (tests/service/test_grpc*.py),
# and two definitions of one name in one process are an import error.
KSERVE_REST_CLIENT = r"""
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

url, features = sys.argv[1], int(sys.argv[2])
x = np.arange(2 * features, dtype=np.float32).reshape(2, features)
out = {}

async def run():
    async with InferenceRESTClient(RESTConfig(protocol="v1", timeout=30)) as v1:
        out["v1_live"] = await v1.is_server_live(url)  # GET / -> {"status": "alive"}
        out["v1_ready"] = await v1.is_model_ready(url, "tiny")
        answer = await v1.infer(url, {"instances": x.tolist()}, model_name="tiny")
        out["v1_logits"] = [p["logits"] for p in answer["predictions"]]
    async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=30)) as v2:
        out["v2_ready"] = await v2.is_server_live(url) and await v2.is_model_ready(url, "tiny")
        for binary in (False, True):
            tensor = InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            result = await v2.infer(url, InferRequest("tiny", [tensor]), model_name="tiny")
            out[f"v2_{binary}"] = {"id": result.id, "logits": result.outputs[0].as_numpy().tolist()}

asyncio.run(run())
print(json.dumps(out))
"""


def test_kserve_rest_client(server: RunningServer) -> None:
    if importlib.util.find_spec("kserve") is None:
        pytest.skip(
            "the kserve package is not installed (not a project dependency: it pulls in the "
            "Kubernetes client and pandas); pip install kserve to run KServe's own client"
        )
    done = subprocess.run(
        [sys.executable, "-c", KSERVE_REST_CLIENT, server.http_url, str(FEATURES)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    x = np.arange(2 * FEATURES, dtype=np.float32).reshape(2, FEATURES)
    assert out["v1_live"] and out["v1_ready"] and out["v2_ready"]
    np.testing.assert_allclose(out["v1_logits"], expected(x), rtol=1e-6)
    for binary in (False, True):
        assert out[f"v2_{binary}"]["id"]
        np.testing.assert_allclose(out[f"v2_{binary}"]["logits"], expected(x), 1e-6)
