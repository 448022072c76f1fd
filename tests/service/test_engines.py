"""The engines behind a model: onnxruntime (always) and OpenVINO (the optional extra).

Real files from the built repository, real engines, the real app in-process. A model's
config picks its engine (``runtime.engine``), which ``python -m export tune`` writes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import pytest
from starlette.testclient import TestClient

from models.data import load_digits_split
from service.app import create_app
from service.errors import RepositoryError
from service.repository import RuntimeOptions, read_config, verified_file, write_config
from service.serving.runtime import OnnxModel, SessionOptions
from service.settings import Settings

try:
    import openvino  # noqa: F401

    HAVE_OPENVINO = True
except ImportError:
    HAVE_OPENVINO = False
needs_openvino = pytest.mark.skipif(
    not HAVE_OPENVINO, reason="OpenVINO is not installed (pip install 'normserve[openvino]')"
)


@pytest.fixture
def repository(model_copies: Callable[..., Path]) -> Path:
    return model_copies("digits_cnn")


def _with_engine(repository: Path, engine: str) -> None:
    config = read_config(repository / "digits_cnn" / "config.json")
    write_config(repository, config.model_copy(update={"runtime": RuntimeOptions(engine=engine)}))


def _images(n: int) -> np.ndarray:
    return load_digits_split().test.images.numpy()[:n].reshape(n, 1, 8, 8)


def _model(repository: Path, engine: str | None = None) -> OnnxModel:
    config = read_config(repository / "digits_cnn" / "config.json")
    if engine is not None:
        config = config.model_copy(update={"runtime": RuntimeOptions(engine=engine)})
    path = verified_file(repository, config, config.latest)
    return OnnxModel(config, config.latest, path, SessionOptions(intra_op_threads=2))


@needs_openvino
def test_openvino_serves_the_same_answers_through_v2(repository: Path) -> None:
    x = _images(16)
    want = _model(repository, "onnxruntime").run({"image": x})["logits"]
    bound = read_config(repository / "digits_cnn" / "config.json").latest.parity_bound
    _with_engine(repository, "openvino")
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.ravel().tolist()}]}  # fmt: skip
    with TestClient(create_app(Settings(repository=repository))) as client:
        meta = client.get("/v2/models/digits_cnn").json()
        assert meta["platform"] == "openvino_onnx"
        assert client.get("/v2/models/digits_cnn/config").json()["backend"] == "openvino"
        response = client.post("/v2/models/digits_cnn/infer", content=orjson.dumps(body))
    assert response.status_code == 200, response.text
    got = np.array(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(16, 10)
    assert np.abs(got - want).max() <= bound
    assert (got.argmax(1) == want.argmax(1)).all()


@needs_openvino
def test_openvino_runs_are_thread_safe(repository: Path) -> None:
    model = _model(repository, "openvino")
    batches = [_images(64)[i : i + 1 + i % 7] for i in range(24)]
    serial = [model.run({"image": b})["logits"] for b in batches]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda b: model.run({"image": b})["logits"], batches))
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_missing_engine_fails_that_model_with_the_install_command(
    repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an absent package looks like
    with pytest.raises(RepositoryError, match=r"pip install 'normserve\[openvino\]'"):
        _model(repository, "openvino")
    _with_engine(repository, "openvino")
    with TestClient(create_app(Settings(repository=repository))) as client:
        answer = client.get("/v2/models/digits_cnn/ready")
        # Unavailable, not unknown: the model is in the repository and failed to load, and
        # the reason names the command that fixes it.
        assert answer.status_code == 503, answer.text
        assert "pip install 'normserve[openvino]'" in answer.json()["error"]


def test_onnxruntime_is_the_default_engine(repository: Path) -> None:
    model = _model(repository)
    assert model.platform == "onnxruntime_onnx"
    assert model.run({"image": _images(3)})["logits"].shape == (3, 10)
