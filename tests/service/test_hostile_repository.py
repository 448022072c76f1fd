"""A repository a hostile or careless hand made: links out of it, a bad config, huge labels,
a model the runtime cannot warm up. Each bad model is UNAVAILABLE with its reason and the
others serve; ``strict_models`` turns any of them into a refusal to start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pytest
from onnx import TensorProto, helper
from starlette.testclient import TestClient
from tiny_onnx import FEATURES, install_source, save_checked, tiny_repository

from service.app import create_app
from service.repository import CONFIG_FILE, ModelConfig
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _index(repository: Path, **settings: object) -> dict[str, dict[str, str]]:
    app = create_app(Settings(repository=repository, access_log=False, **settings))
    with TestClient(app) as client:
        x = np.zeros((1, FEATURES), np.float32)
        body = {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, FEATURES],
                    "data": x.ravel().tolist(),
                }
            ]
        }
        # The good model serves whatever else is in the repository.
        assert client.post("/v2/models/tiny/infer", json=body).status_code == 200
        index = {entry["name"]: entry for entry in client.post("/v2/repository/index").json()}
        # Strict readiness: ready only when every model in the repository is.
        all_ready = all(entry["state"] == "READY" for entry in index.values())
        assert client.get("/v2/health/ready").status_code == (200 if all_ready else 503)
    return index


def _copy_model(repository: Path, name: str, into: Path) -> Path:
    """A second model in ``into``: the tiny model under another name, outside or inside."""
    target = into / name
    shutil.copytree(repository / "tiny", target)
    config = json.loads((target / CONFIG_FILE).read_text())
    config["name"] = name
    (target / CONFIG_FILE).write_text(json.dumps(config))
    return target


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return tiny_repository(tmp_path)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    directory = tmp_path / "elsewhere"
    directory.mkdir()
    return directory


Attack = Callable[[Path, Path], None]


def _linked_model_dir(repository: Path, outside: Path) -> None:
    _copy_model(repository, "linked", outside)
    (repository / "linked").symlink_to(outside / "linked", target_is_directory=True)


def _linked_version_dir(repository: Path, outside: Path) -> None:
    model = _copy_model(repository, "linked", repository)
    shutil.move(model / "1", outside / "1")
    (model / "1").symlink_to(outside / "1", target_is_directory=True)


def _linked_model_file(repository: Path, outside: Path) -> None:
    model = _copy_model(repository, "linked", repository)
    shutil.move(model / "1" / "model.onnx", outside / "model.onnx")
    (model / "1" / "model.onnx").symlink_to(outside / "model.onnx")


def _linked_config(repository: Path, outside: Path) -> None:
    model = _copy_model(repository, "linked", repository)
    shutil.move(model / CONFIG_FILE, outside / CONFIG_FILE)
    (model / CONFIG_FILE).symlink_to(outside / CONFIG_FILE)


@pytest.mark.parametrize(
    "attack",
    [_linked_model_dir, _linked_version_dir, _linked_model_file, _linked_config],
    ids=["model-dir", "version-dir", "model-file", "config"],
)
def test_links_out_of_the_repository_are_refused(
    repository: Path, outside: Path, attack: Attack
) -> None:
    attack(repository, outside)
    index = _index(repository)
    assert index["tiny"]["state"] == "READY"
    assert index["linked"]["state"] == "UNAVAILABLE"
    reason = index["linked"]["reason"]
    assert "outside the model repository" in reason
    assert str(outside) not in reason and str(repository) not in reason  # no server paths


def test_a_link_inside_the_repository_is_fine(repository: Path, tmp_path: Path) -> None:
    model = _copy_model(repository, "linked", repository)
    shutil.move(model / "1", repository / "linked" / "real-1")
    (model / "1").symlink_to(model / "real-1", target_is_directory=True)
    assert _index(repository)["linked"]["state"] == "READY"


def test_a_bad_config_makes_only_that_model_unavailable(repository: Path) -> None:
    (repository / "broken").mkdir()
    (repository / "broken" / CONFIG_FILE).write_text('{"name": "broken", "inputs": 5}')
    reason = _index(repository)["broken"]["reason"]
    assert reason.startswith(f"broken/{CONFIG_FILE}: invalid model config") and "inputs" in reason


def test_labels_are_bounded_in_length(repository: Path) -> None:
    """10 labels of 1 MB once turned a 21 KB V1 request into a 704 MB response."""
    config = json.loads((repository / "tiny" / CONFIG_FILE).read_text())
    big = _copy_model(repository, "big_labels", repository)
    config.update(name="big_labels", labels=["x" * 1_000_000] * 3)
    (big / CONFIG_FILE).write_text(json.dumps(config))
    reason = _index(repository)["big_labels"]["reason"]
    assert "labels" in reason and "256 characters" in reason
    assert len(reason) < 1000


def _install(
    root: Path,
    source: Path,
    name: str,
    one_input: tuple[str, str, list[int]],
    one_output: tuple[str, str, list[int]],
) -> None:
    """``source`` as model ``name`` in the repository under ``root``, one input, one output."""

    def spec(entry: tuple[str, str, list[int]]) -> dict[str, object]:
        return dict(zip(("name", "datatype", "shape"), entry, strict=True))

    install_source(
        root, source, {"name": name, "inputs": [spec(one_input)], "outputs": [spec(one_output)]}
    )


def _write_string_model(path: Path) -> Path:
    """BYTES in, its length out: onnxruntime can run it (once the warm-up feeds strings)."""
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["text"], ["shape"]),
            helper.make_node("Cast", ["shape"], ["length"], to=TensorProto.FLOAT),
        ],
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 2])],
        [helper.make_tensor_value_info("length", TensorProto.FLOAT, [2])],
    )
    return save_checked(graph, path)


def test_a_bytes_input_model_warms_up_and_serves_beside_the_others(
    repository: Path, tmp_path: Path
) -> None:
    source = _write_string_model(tmp_path / "strings.onnx")
    _install(tmp_path, source, "strings", ("text", "BYTES", [-1, 2]), ("length", "FP32", [-1]))
    assert _index(repository)["strings"]["state"] == "READY"


def _write_failing_warmup_model(path: Path) -> Path:
    """Loads fine, but its first inference fails: Reshape to a shape one row cannot fill."""
    graph = helper.make_graph(
        [
            helper.make_node(
                "Constant",
                [],
                ["to"],
                value=helper.make_tensor("to", TensorProto.INT64, [2], [-1, 3]),
            ),
            helper.make_node("Reshape", ["x", "to"], ["y"]),
        ],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 3])],
    )
    return save_checked(graph, path)


def test_a_model_whose_warm_up_fails_is_unavailable_and_the_server_serves(
    repository: Path, tmp_path: Path
) -> None:
    source = _write_failing_warmup_model(tmp_path / "reshape.onnx")
    _install(tmp_path, source, "reshape", ("x", "FP32", [-1, 2]), ("y", "FP32", [-1, 3]))
    entry = _index(repository)["reshape"]
    assert entry["state"] == "UNAVAILABLE" and "warm-up" in entry["reason"]
    assert "Reshape" not in entry["reason"]  # onnxruntime's text stays in the log


def test_strict_models_refuses_to_start_and_names_the_model(repository: Path) -> None:
    (repository / "broken").mkdir()
    (repository / "broken" / CONFIG_FILE).write_text("{")
    result = subprocess.run(
        [sys.executable, "-m", "service", "--repository", str(repository),
         "--strict-models", "true", "--port", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and "broken" in result.stderr
    assert "Traceback" not in result.stderr


def test_model_config_is_strict_about_label_count(repository: Path) -> None:
    config = json.loads((repository / "tiny" / CONFIG_FILE).read_text())
    config["labels"] = ["a"] * 100_001
    with pytest.raises(ValueError, match="at most 100000"):
        ModelConfig.model_validate_json(orjson.dumps(config))
