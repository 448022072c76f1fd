"""README's curl examples, sent as written to the service over the built default models
(issue 18, point 5): the digit is a "2" of the test split and every default model reads it
as a 2."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from servers import ROOT, RunningServer

README = ROOT / "README.md"


def _curl_body(path: str) -> dict[str, Any]:
    """The JSON after ``-d '`` of README's curl command that POSTs to ``path``."""
    text = README.read_text()
    match = re.search(rf"curl -s -X POST localhost:8000{re.escape(path)} -d '([^']*)'", text)
    assert match, f"README has no curl example for {path}"
    body: dict[str, Any] = json.loads(match[1])
    return body


def test_the_v1_example_is_a_test_digit_read_as_two(
    server: RunningServer, built_repository: tuple[Path, Path, str]
) -> None:
    body = _curl_body("/v1/models/digits_cnn:predict")
    response = httpx.post(f"{server.http_url}/v1/models/digits_cnn:predict", json=body)
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    assert prediction["label"] == "2", prediction["probabilities"]
    assert prediction["probability"] >= 0.99  # README shows 0.99...

    # The image is one of the test split's 2s, as README says.
    image = np.asarray(body["instances"][0], dtype=np.float64).reshape(64)
    samples = json.loads((built_repository[0] / "_web" / "digits_test.json").read_text())
    scaled = np.asarray(samples["images"], dtype=np.float64) / samples["scale"]
    matches = np.flatnonzero(np.all(scaled == image, axis=1))
    assert [samples["labels"][i] for i in matches] == ["2"]
    assert matches.tolist() == [56]  # README: "its 57th digit"


def test_the_v2_example_reads_as_two_on_every_default_model(server: RunningServer) -> None:
    body = _curl_body("/v2/models/digits_transformer/infer")
    image = body["inputs"][0]["data"]
    assert body["inputs"][0]["shape"] == [1, 8, 8] and len(image) == 64
    models = [m["name"] for m in httpx.post(f"{server.http_url}/v2/repository/index").json()]
    assert "digits_transformer" in models
    read = {}
    for name in models:
        metadata = httpx.get(f"{server.http_url}/v2/models/{name}").json()
        if metadata["parameters"].get("batch_dependent"):
            continue  # alone it answers every input alike (README: The default models)
        (spec,) = metadata["inputs"]
        # A variable axis (-1: digits_sequence's rows) takes what the 64 values leave for it.
        dims = spec["shape"][1:]
        fixed = int(np.prod([d for d in dims if d != -1]))
        shape = [1, *(len(image) // fixed if d == -1 else d for d in dims)]
        request = {"inputs": [{"name": spec["name"], "datatype": "FP32", "shape": shape,
                               "data": image}]}  # fmt: skip
        response = httpx.post(f"{server.http_url}/v2/models/{name}/infer", json=request)
        assert response.status_code == 200, response.text
        (logits,) = response.json()["outputs"]
        read[name] = int(np.argmax(logits["data"]))
    assert set(read) >= {"digits_cnn", "digits_transformer", "digits_recurrent", "digits_sequence"}
    assert read == dict.fromkeys(read, 2), read
