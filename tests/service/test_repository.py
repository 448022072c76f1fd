"""The model repository format: config validation, listing, integrity and installation.

Pure pydantic and hashlib: no torch here. The model files are arbitrary bytes, since this
layer only copies them and records their sha256.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from service.errors import IntegrityError, RepositoryError
from service.repository import (
    CONFIG_FILE,
    MODEL_FILE,
    ModelConfig,
    ModelVersion,
    install_model,
    list_models,
    model_file,
    next_version,
    read_config,
    verified_file,
)

MODEL_BYTES = b"not really onnx, but bytes are all this layer copies\x00\x01\x02"
PLACEHOLDER_SHA = "0" * 64


def version_dict(number: int = 1, sha256: str | None = None) -> dict[str, Any]:
    return {
        "version": number,
        "sha256": sha256 if sha256 is not None else hashlib.sha256(b"%d" % number).hexdigest(),
        "opset": 18,
        "exported_at": "2024-05-06T07:08:09Z",
        "source": "usermodels:tiny",
        "bn_folded": 1,
        "bn_kept": 0,
        "layernorm_nodes": 0,
        "parity_max_abs_error": 2.5e-7,
        "parity_bound": 1e-5,
        "metrics": {"test_accuracy": 0.975},
    }


def config_dict(name: str = "tiny", **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": name,
        "description": "a tiny classifier",
        "max_batch_size": 32,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 16, 16]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 5]}],
        "labels": ["a", "b", "c", "d", "e"],
        "batching": {"max_batch_size": 16, "max_queue_delay_ms": 2.5},
        "runtime": {"intra_op_threads": 2, "graph_optimization_level": "all"},
        "versions": [version_dict(1), version_dict(3)],
    }
    config.update(overrides)
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path


def new_config(name: str = "tiny", **overrides: Any) -> ModelConfig:
    """A config as export/ builds it before installing: no versions yet."""
    return ModelConfig.model_validate(config_dict(name, versions=[], **overrides))


def new_version(number: int) -> ModelVersion:
    return ModelVersion.model_validate(version_dict(number, sha256=PLACEHOLDER_SHA))


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "exported" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(MODEL_BYTES)
    return path


# --- the format ---------------------------------------------------------------------------


def test_valid_config_round_trips() -> None:
    text = json.dumps(config_dict())
    config = ModelConfig.model_validate_json(text)
    dumped = config.model_dump_json()
    again = ModelConfig.model_validate_json(dumped)
    assert again == config
    assert again.model_dump_json() == dumped
    # Every field written is read back unchanged (the defaults are added, nothing else).
    data = json.loads(dumped)
    source = config_dict()
    for key in ("name", "description", "max_batch_size", "inputs", "outputs", "labels"):
        assert data[key] == source[key], key
    assert data["format"] == 1
    assert data["platform"] == "onnxruntime_onnx"
    assert [v["version"] for v in data["versions"]] == [1, 3]
    assert data["versions"][0]["sha256"] == source["versions"][0]["sha256"]
    assert data["versions"][0]["metrics"] == {"test_accuracy": 0.975}
    assert again.versions[0].exported_at == datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def test_read_config_of_a_valid_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "tiny" / CONFIG_FILE, config_dict())
    assert read_config(path) == ModelConfig.model_validate(config_dict())


def _with_input(**changes: Any) -> dict[str, Any]:
    config = config_dict()
    config["inputs"] = [{**config["inputs"][0], **changes}]
    return config


def _bad_version_sha() -> dict[str, Any]:
    config = config_dict()
    config["versions"] = [version_dict(1, sha256="ABC" + "0" * 61)]
    return config


BAD_CONFIGS = [
    pytest.param(_with_input(shape=[1, 8, 8]), ["inputs.0", "batch axis", "[1, 8, 8]"], id="batch"),
    pytest.param(
        {**config_dict(), "max_batchsize": 8}, ["max_batchsize", "Extra inputs"], id="unknown-key"
    ),
    pytest.param(_with_input(datatype="FLOAT32"), ["inputs.0.datatype", "FP32"], id="datatype"),
    pytest.param(
        config_dict(
            inputs=[
                {"name": "x", "datatype": "FP32", "shape": [-1, 3]},
                {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
            ]
        ),
        ["input names must be unique", "'x'"],
        id="duplicate-inputs",
    ),
    pytest.param(
        config_dict(versions=[version_dict(2), version_dict(2)]),
        ["versions must be unique", "[2, 2]"],
        id="duplicate-versions",
    ),
    pytest.param(
        config_dict(labels=["a", "b", "c"]), ["3 labels", "[-1, C]", "[5]"], id="labels-count"
    ),
    pytest.param(config_dict(name="../evil"), ["name", "pattern"], id="model-name"),
    pytest.param(_bad_version_sha(), ["versions.0.sha256", "pattern"], id="sha256"),
]


@pytest.mark.parametrize(("config", "expected"), BAD_CONFIGS)
def test_read_config_names_file_and_problem(
    tmp_path: Path, config: dict[str, Any], expected: list[str]
) -> None:
    path = write_config(tmp_path / "tiny" / CONFIG_FILE, config)
    with pytest.raises(RepositoryError) as info:
        read_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "invalid model config" in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_read_config_of_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nothing" / CONFIG_FILE
    with pytest.raises(RepositoryError, match="no such file"):
        read_config(path)


def test_read_config_of_an_unreadable_path_is_a_repository_error(tmp_path: Path) -> None:
    """An OSError other than 'missing' (here: a directory; as root, mode 000 reads fine) is
    reported like any other repository problem, not as a traceback at start-up."""
    path = tmp_path / "tiny" / CONFIG_FILE
    path.mkdir(parents=True)
    with pytest.raises(RepositoryError, match="cannot be read"):
        read_config(path)
    with pytest.raises(RepositoryError, match="cannot be read"):
        list_models(tmp_path)


def test_read_config_of_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "tiny" / CONFIG_FILE
    path.parent.mkdir()
    path.write_text('{"name": "tiny",')
    with pytest.raises(RepositoryError) as info:
        read_config(path)
    assert str(path) in str(info.value)


def test_batch_axis_may_be_variable_on_other_axes_too() -> None:
    # Only axis 0 is constrained; -1 elsewhere means a dynamic axis.
    config = ModelConfig.model_validate(
        config_dict(outputs=[{"name": "output", "datatype": "FP32", "shape": [-1, 5]}])
    )
    assert config.outputs[0].shape == [-1, 5]


def test_labels_may_match_any_two_dimensional_output() -> None:
    config = ModelConfig.model_validate(
        config_dict(
            outputs=[
                {"name": "features", "datatype": "FP32", "shape": [-1, 4, 4]},
                {"name": "logits", "datatype": "FP32", "shape": [-1, 5]},
            ]
        )
    )
    assert config.labels == ["a", "b", "c", "d", "e"]
    assert ModelConfig.model_validate(config_dict(labels=None)).labels is None


# --- versions -----------------------------------------------------------------------------


def test_version_none_is_the_latest() -> None:
    config = ModelConfig.model_validate(config_dict(versions=[version_dict(3), version_dict(1)]))
    assert config.version(None).version == 3
    assert config.latest.version == 3
    assert config.version(1).version == 1


def test_missing_version_raises() -> None:
    config = ModelConfig.model_validate(config_dict())
    with pytest.raises(RepositoryError, match="no version 2"):
        config.version(2)


def test_no_versions_has_no_latest() -> None:
    config = new_config()
    with pytest.raises(RepositoryError, match="no versions"):
        config.version(None)


# --- listing ------------------------------------------------------------------------------


def test_list_models_sorted_by_name(tmp_path: Path) -> None:
    for name in ("zeta", "alpha", "mid"):
        write_config(tmp_path / name / CONFIG_FILE, config_dict(name))
    (tmp_path / "not-a-model").mkdir()  # no config.json: ignored
    assert [c.name for c in list_models(tmp_path)] == ["alpha", "mid", "zeta"]


def test_list_models_of_an_empty_repository(tmp_path: Path) -> None:
    assert list_models(tmp_path) == []


def test_list_models_refuses_a_name_that_differs_from_its_directory(tmp_path: Path) -> None:
    write_config(tmp_path / "alpha" / CONFIG_FILE, config_dict("alpha"))
    path = write_config(tmp_path / "renamed" / CONFIG_FILE, config_dict("tiny"))
    with pytest.raises(RepositoryError) as info:
        list_models(tmp_path)
    message = str(info.value)
    # Relative to the repository: the reason also reaches clients through the index.
    assert message.startswith("renamed/config.json") and str(tmp_path) not in message
    assert path.exists() and "'tiny'" in message
    assert "'renamed'" in message


def test_list_models_refuses_a_missing_root(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        list_models(tmp_path / "missing")
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(RepositoryError, match="not a directory"):
        list_models(a_file)


def test_list_models_reports_an_invalid_config(tmp_path: Path) -> None:
    path = write_config(tmp_path / "tiny" / CONFIG_FILE, _with_input(datatype="FLOAT32"))
    with pytest.raises(RepositoryError) as info:
        list_models(tmp_path)
    assert str(info.value).startswith("tiny/config.json: invalid model config")
    assert path.exists() and str(tmp_path) not in str(info.value)
    assert "datatype" in str(info.value)


# --- integrity ----------------------------------------------------------------------------


def _stored(root: Path, content: bytes = MODEL_BYTES) -> tuple[ModelConfig, ModelVersion, Path]:
    config = ModelConfig.model_validate(
        config_dict(versions=[version_dict(1, sha256=hashlib.sha256(content).hexdigest())])
    )
    version = config.version(1)
    path = root / "tiny" / "1" / MODEL_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    return config, version, path


def test_verified_file_returns_the_path_when_the_hash_matches(tmp_path: Path) -> None:
    config, version, path = _stored(tmp_path)
    assert model_file(tmp_path, config, version) == path
    assert verified_file(tmp_path, config, version) == path


def test_verified_file_detects_one_changed_byte(tmp_path: Path) -> None:
    config, version, path = _stored(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        verified_file(tmp_path, config, version)
    assert isinstance(info.value, RepositoryError)
    message = str(info.value)
    assert version.sha256 in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    # Names the file relative to the repository: the message can reach clients.
    assert str(path.relative_to(tmp_path)) in message and str(tmp_path) not in message


def test_verified_file_reports_a_missing_file(tmp_path: Path) -> None:
    config, version, path = _stored(tmp_path)
    path.unlink()
    with pytest.raises(RepositoryError) as info:
        verified_file(tmp_path, config, version)
    assert not isinstance(info.value, IntegrityError)
    assert "missing" in str(info.value)
    assert str(path.relative_to(tmp_path)) in str(info.value)
    assert str(tmp_path) not in str(info.value)


# --- installation -------------------------------------------------------------------------


def test_install_writes_the_layout_and_records_the_real_hash(
    tmp_path: Path, onnx_file: Path
) -> None:
    root = tmp_path / "repo"
    assert next_version(root, "tiny") == 1
    installed = install_model(root, new_config(), onnx_file, new_version(1))

    model_path = root / "tiny" / "1" / MODEL_FILE
    assert model_path.read_bytes() == MODEL_BYTES
    real_sha = hashlib.sha256(MODEL_BYTES).hexdigest()
    assert installed.version(1).sha256 == real_sha != PLACEHOLDER_SHA
    assert [v.version for v in installed.versions] == [1]

    on_disk = read_config(root / "tiny" / CONFIG_FILE)
    assert on_disk == installed
    assert on_disk.labels == ["a", "b", "c", "d", "e"]
    assert verified_file(root, on_disk, on_disk.latest) == model_path
    assert [c.name for c in list_models(root)] == ["tiny"]
    assert next_version(root, "tiny") == 2
    assert onnx_file.read_bytes() == MODEL_BYTES  # the source is copied, not moved


def test_installed_files_are_readable_by_other_users(tmp_path: Path, onnx_file: Path) -> None:
    """The image's non-root server reads a repository built by another user: mkstemp's 0600
    must not survive into config.json (it did, and the server could not start)."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        install_model(tmp_path / "repo", new_config(), onnx_file, new_version(1))
    finally:
        os.umask(previous)
    for path in (
        tmp_path / "repo" / "tiny" / CONFIG_FILE,
        tmp_path / "repo" / "tiny" / "1" / MODEL_FILE,
    ):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o644, f"{path.name}: {oct(mode)}"


def test_install_leaves_no_temporary_files(tmp_path: Path, onnx_file: Path) -> None:
    root = tmp_path / "repo"
    install_model(root, new_config(), onnx_file, new_version(1))
    install_model(root, new_config(), onnx_file, new_version(2))
    hidden = [p for p in (root / "tiny").rglob("*") if p.name.startswith(".")]
    assert hidden == []
    assert sorted(p.name for p in (root / "tiny").iterdir()) == ["1", "2", CONFIG_FILE]
    for number in ("1", "2"):
        assert [p.name for p in (root / "tiny" / number).iterdir()] == [MODEL_FILE]


def test_install_a_second_version_keeps_the_first(tmp_path: Path, onnx_file: Path) -> None:
    root = tmp_path / "repo"
    install_model(root, new_config(), onnx_file, new_version(1))
    second = tmp_path / "second.onnx"
    second.write_bytes(MODEL_BYTES + b"v2")
    assert next_version(root, "tiny") == 2
    installed = install_model(root, new_config(), second, new_version(2))

    assert [v.version for v in installed.versions] == [1, 2]
    assert installed.version(1).sha256 == hashlib.sha256(MODEL_BYTES).hexdigest()
    assert installed.version(2).sha256 == hashlib.sha256(MODEL_BYTES + b"v2").hexdigest()
    assert installed.latest.version == 2
    on_disk = read_config(root / "tiny" / CONFIG_FILE)
    assert on_disk == installed
    for version in on_disk.versions:
        verified_file(root, on_disk, version)
    assert next_version(root, "tiny") == 3


def _other_signature() -> ModelConfig:
    return new_config(
        inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
        outputs=[{"name": "output", "datatype": "FP32", "shape": [-1, 5]}],
    )


def test_install_refuses_another_signature(tmp_path: Path, onnx_file: Path) -> None:
    root = tmp_path / "repo"
    install_model(root, new_config(), onnx_file, new_version(1))
    before = (root / "tiny" / CONFIG_FILE).read_bytes()
    with pytest.raises(RepositoryError, match="another signature"):
        install_model(root, _other_signature(), onnx_file, new_version(2))
    # Nothing changed on disk.
    assert (root / "tiny" / CONFIG_FILE).read_bytes() == before
    assert not (root / "tiny" / "2").exists()


def test_install_replace_drops_the_old_versions(tmp_path: Path, onnx_file: Path) -> None:
    root = tmp_path / "repo"
    install_model(root, new_config(), onnx_file, new_version(1))
    install_model(root, new_config(), onnx_file, new_version(2))
    replaced = install_model(root, _other_signature(), onnx_file, new_version(3), replace=True)

    assert [v.version for v in replaced.versions] == [3]
    assert replaced.inputs[0].shape == [-1, 1, 8, 8]
    assert not (root / "tiny" / "1").exists()
    assert not (root / "tiny" / "2").exists()
    assert (root / "tiny" / "3" / MODEL_FILE).read_bytes() == MODEL_BYTES
    assert read_config(root / "tiny" / CONFIG_FILE) == replaced
    assert next_version(root, "tiny") == 4


def test_install_ignores_versions_in_the_given_config(tmp_path: Path, onnx_file: Path) -> None:
    # The config's own version list is not trusted: only the installed version is recorded.
    root = tmp_path / "repo"
    stale = ModelConfig.model_validate(config_dict())  # lists versions 1 and 3
    installed = install_model(root, stale, onnx_file, new_version(1))
    assert [v.version for v in installed.versions] == [1]


def test_config_on_disk_is_valid_json_that_read_config_accepts(
    tmp_path: Path, onnx_file: Path
) -> None:
    root = tmp_path / "repo"
    installed = install_model(root, new_config(), onnx_file, new_version(1))
    text = (root / "tiny" / CONFIG_FILE).read_text()
    data = json.loads(text)
    assert data["name"] == "tiny"
    assert data["versions"][0]["sha256"] == hashlib.sha256(MODEL_BYTES).hexdigest()
    assert ModelConfig.model_validate_json(text) == installed
    assert read_config(root / "tiny" / CONFIG_FILE) == installed


@pytest.mark.parametrize("file", ["../../elsewhere.onnx", "/etc/passwd"])
def test_read_config_refuses_a_model_file_outside_its_version_directory(
    tmp_path: Path, file: str
) -> None:
    # The model name is restricted to a safe pattern so that <root>/<name> stays inside the
    # repository; a version's file must stay inside <root>/<name>/<version> for the same
    # reason (verified_file and install_model join it onto that directory).
    config = config_dict()
    config["versions"] = [{**version_dict(1), "file": file}]
    path = write_config(tmp_path / "tiny" / CONFIG_FILE, config)
    with pytest.raises(RepositoryError) as info:
        read_config(path)
    assert "versions.0.file" in str(info.value)
