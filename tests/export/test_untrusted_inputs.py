"""Files from strangers: pickled checkpoints with a payload, ONNX external data that points
outside the model directory, and safetensors files that are cut short or garbage.

Each must be refused with a message (CheckpointError, or a model that is not ready with its
reason), the payload must never run, the file outside the model directory must never be
served, and the CLI must answer with one ``error:`` line, never a traceback.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cli_runner import run_cli_in_process as run_in_process
from onnx import TensorProto, helper
from safetensors.torch import save_file
from starlette.testclient import TestClient
from tiny_onnx import CLASSES, FEATURES, WEIGHT, tiny_repository

from export.checkpoint import CheckpointError, load_into, load_state_dict
from service.app import create_app
from service.repository import ModelConfig, ModelVersion, TensorSpec, install_model, now
from service.settings import Settings

USER_MODULE = "untrusted_inputs_user_model"
USER_SOURCE = """\
from torch import nn


def linear():
    return nn.Linear(4, 3)
"""


# --------------------------------------------------------------------------------------------
# Pickled checkpoints carrying code


class ShellPayload:
    """Unpickling this runs ``touch <canary>`` through os.system."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (os.system, (f"touch '{self.canary}'",))


class TouchPayload:
    """Unpickling this calls pathlib.Path.touch(canary): no shell needed."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.canary),))


def _torch_save(obj: object, path: Path) -> None:
    torch.save(obj, path)


def _pickle_dump(obj: object, path: Path) -> None:
    # Protocol 2: what torch's legacy format uses, so the loader gets as far as the payload's
    # global instead of stopping at an opcode it does not know.
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


PAYLOADS: dict[str, Callable[[Path], object]] = {
    "os.system": ShellPayload,
    "Path.touch": TouchPayload,
    # Hidden among real tensors, as a tampered state_dict would be.
    "inside-a-state-dict": lambda canary: {
        "weight": torch.zeros(3, 4),
        "bias": TouchPayload(canary),
    },
    "under-state_dict-key": lambda canary: {"state_dict": {"weight": ShellPayload(canary)}},
}
WRITERS = {
    "torch.save-.pt": (_torch_save, "evil.pt"),
    "pickle.dump-.pth": (_pickle_dump, "evil.pth"),
}


@pytest.fixture(params=sorted(PAYLOADS))
def payload(request: pytest.FixtureRequest) -> Callable[[Path], object]:
    return PAYLOADS[request.param]


@pytest.fixture(params=sorted(WRITERS))
def evil_checkpoint(
    request: pytest.FixtureRequest, tmp_path: Path, payload: Callable[[Path], object]
) -> Iterator[tuple[Path, Path]]:
    """(checkpoint, canary): the checkpoint creates the canary if it is ever unpickled."""
    write, name = WRITERS[request.param]
    canary = tmp_path / "CANARY"
    checkpoint = tmp_path / name
    write(payload(canary), checkpoint)
    assert not canary.exists()
    yield checkpoint, canary
    # Also after the test's own assertions: nothing ran late (a finalizer, a second load).
    assert not canary.exists(), "the pickled payload ran"


def test_pickled_payload_is_refused_and_never_runs(evil_checkpoint: tuple[Path, Path]) -> None:
    checkpoint, canary = evil_checkpoint
    with pytest.raises(CheckpointError, match=r"weights_only=True") as refused:
        load_state_dict(checkpoint)
    assert checkpoint.name in str(refused.value)
    assert not canary.exists()
    with pytest.raises(CheckpointError):
        load_into(torch.nn.Linear(4, 3), checkpoint)
    assert not canary.exists()


def test_refusal_does_not_advise_an_unsafe_workaround(evil_checkpoint: tuple[Path, Path]) -> None:
    """checkpoint.py drops torch's advice to use weights_only=False; allowlisting the refused
    global (add_safe_globals([getattr]), ...) is the same advice in other words."""
    checkpoint, _ = evil_checkpoint
    with pytest.raises(CheckpointError) as refused:
        load_state_dict(checkpoint)
    message = str(refused.value)
    for unsafe in ("weights_only=False", "add_safe_globals", "safe_globals(", "allowlist"):
        assert unsafe not in message, f"the refusal suggests {unsafe!r}: {message}"


def run_cli_in_process(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_in_process(cwd, *args, user_module=USER_MODULE)


def export_with_checkpoint(directory: Path, checkpoint: Path) -> subprocess.CompletedProcess[str]:
    (directory / f"{USER_MODULE}.py").write_text(USER_SOURCE)
    return run_cli_in_process(
        directory,
        "onnx",
        "--model",
        f"{USER_MODULE}:linear",
        "--checkpoint",
        str(checkpoint),
        "--input-shape",
        str(FEATURES),
        "--name",
        "untrusted",
        "--repository",
        "repo",
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def test_cli_refuses_a_pickled_payload_with_one_error_line(
    tmp_path: Path, evil_checkpoint: tuple[Path, Path]
) -> None:
    checkpoint, canary = evil_checkpoint
    result = export_with_checkpoint(tmp_path, checkpoint)
    assert_one_error_line(result, checkpoint.name, "weights_only=True")
    assert not canary.exists()
    assert not (tmp_path / "repo").exists(), "nothing may be exported from a refused checkpoint"


# --------------------------------------------------------------------------------------------
# Safetensors files that are not


def _good_safetensors(directory: Path) -> bytes:
    layer = torch.nn.Linear(FEATURES, CLASSES)
    target = directory / "good.safetensors"
    save_file({k: v.detach().contiguous() for k, v in layer.state_dict().items()}, str(target))
    return target.read_bytes()


def _header(document: bytes) -> bytes:
    return struct.pack("<Q", len(document)) + document


BROKEN_SAFETENSORS: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda good: b"",
    "truncated-tensor-data": lambda good: good[:-7],
    "truncated-inside-header": lambda good: good[:20],
    "garbage": lambda good: bytes(range(256)) * 4,
    "header-length-2**63": lambda good: struct.pack("<Q", 2**63) + b"{}",
    "header-not-json": lambda good: _header(b"{weight: nope}"),
    "offsets-past-the-end": lambda good: (
        _header(b'{"weight":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}')
        + b"\0" * 16
    ),
    "shape-disagrees-with-offsets": lambda good: (
        _header(b'{"weight":{"dtype":"F32","shape":[3,4],"data_offsets":[0,8]}}') + b"\0" * 8
    ),
}


@pytest.fixture(params=sorted(BROKEN_SAFETENSORS))
def broken_safetensors(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / f"{request.param}.safetensors"
    path.write_bytes(BROKEN_SAFETENSORS[request.param](_good_safetensors(tmp_path)))
    return path


def test_broken_safetensors_is_a_checkpoint_error(broken_safetensors: Path) -> None:
    with pytest.raises(CheckpointError) as refused:
        load_state_dict(broken_safetensors)
    message = str(refused.value)
    assert broken_safetensors.name in message and "not a readable safetensors file" in message
    assert "\n" not in message


def test_cli_refuses_broken_safetensors_without_a_traceback(
    tmp_path: Path, broken_safetensors: Path
) -> None:
    result = export_with_checkpoint(tmp_path, broken_safetensors)
    assert_one_error_line(result, broken_safetensors.name, "not a readable safetensors file")
    assert not (tmp_path / "repo").exists()


# --------------------------------------------------------------------------------------------
# ONNX external data outside the model directory

NAME = "escape"


def write_external_data_onnx(path: Path, location: str) -> Path:
    """x FP32 [batch, 4] @ W -> scores [batch, 3], W stored as external data at ``location``."""
    weight = TensorProto()
    weight.name = "W"
    weight.data_type = TensorProto.FLOAT
    weight.dims.extend(WEIGHT.shape)
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(WEIGHT.nbytes))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["scores"])],
        NAME,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", CLASSES])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    # Serialized directly: onnx.save would try to resolve (and might rewrite) external data.
    path.write_bytes(model.SerializeToString())
    return path


def install_escaping_model(repository: Path, location: str, tmp_path: Path) -> Path:
    """Installs the model through the real format code; returns the version directory."""
    source = write_external_data_onnx(tmp_path / "escape-source.onnx", location)
    config = ModelConfig.model_validate(
        {
            "name": NAME,
            "inputs": [TensorSpec(name="x", datatype="FP32", shape=[-1, FEATURES]).model_dump()],
            "outputs": [
                TensorSpec(name="scores", datatype="FP32", shape=[-1, CLASSES]).model_dump()
            ],
            "max_batch_size": 8,
        }
    )
    version = ModelVersion(
        version=1,
        sha256="0" * 64,  # install_model records the real sha256 of the copied file
        opset=18,
        exported_at=now(),
        parity_max_abs_error=0.0,
        parity_bound=1e-5,
    )
    install_model(repository, config, source, version)
    source.unlink()
    return repository / NAME / "1"


def _relative(levels: int) -> Callable[[Path, Path], tuple[str, Path]]:
    def place(version_dir: Path, tmp_path: Path) -> tuple[str, Path]:
        target = version_dir.joinpath(*[".."] * levels).resolve() / "outside.bin"
        return "/".join([".."] * levels + ["outside.bin"]), target

    return place


def _absolute(version_dir: Path, tmp_path: Path) -> tuple[str, Path]:
    target = tmp_path / "outside.bin"
    return str(target), target


def _etc_passwd(version_dir: Path, tmp_path: Path) -> tuple[str, Path]:
    return "/etc/passwd", Path("/etc/passwd")


def _symlink(version_dir: Path, tmp_path: Path) -> tuple[str, Path]:
    # A name inside the directory that is a link to a file outside it.
    return "weights.bin", tmp_path / "outside.bin"


ESCAPES: dict[str, Callable[[Path, Path], tuple[str, Path]]] = {
    "../outside.bin (model dir)": _relative(1),
    "../../outside.bin (repository root)": _relative(2),
    "../../../outside.bin (above the repository)": _relative(3),
    "absolute path": _absolute,
    "/etc/passwd": _etc_passwd,
    "symlink to outside": _symlink,
}


@pytest.fixture(params=sorted(ESCAPES))
def escaping_repository(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The tiny model, plus one whose weights point outside its version directory.

    The outside file exists and holds exactly the weights the model needs, so that a
    refusal comes from the path, not from a missing or malformed file.
    """
    repository = tiny_repository(tmp_path)
    version_dir = repository / NAME / "1"
    location, target = ESCAPES[request.param](version_dir, tmp_path)
    if request.param == "symlink to outside":
        if not hasattr(os, "symlink"):
            pytest.skip("no symlinks here")
        version_dir.mkdir(parents=True, exist_ok=True)
        (version_dir / location).symlink_to(target)
    if target != Path("/etc/passwd"):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(WEIGHT.astype("<f4").tobytes())
    install_escaping_model(repository, location, tmp_path)
    return repository


def _index(client: TestClient) -> dict[str, dict[str, str]]:
    response = client.post("/v2/repository/index")
    assert response.status_code == 200
    return {entry["name"]: entry for entry in response.json()}


def test_external_data_outside_the_model_directory_is_not_served(
    escaping_repository: Path,
) -> None:
    row = [1.0] * FEATURES
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, FEATURES], "data": row}]}
    app = create_app(Settings(repository=escaping_repository, access_log=False))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/v2/health/live").status_code == 200
        ready = client.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json() == {"ready": False}
        # Not served: no metadata, no readiness, no inference.
        assert client.get(f"/v2/models/{NAME}/ready").status_code == 503
        assert client.get(f"/v2/models/{NAME}").status_code == 503
        infer = client.post(f"/v2/models/{NAME}/infer", json=body)
        assert infer.status_code == 503, infer.text
        assert "error" in infer.json() and "outputs" not in infer.json()
        index = _index(client)
        assert index[NAME]["state"] == "UNAVAILABLE", index
        # The server and its other model stay up.
        assert index["tiny"]["state"] == "READY", index
        assert client.post("/v2/models/tiny/infer", json=body).status_code == 200


def test_external_data_refusal_names_the_reason(escaping_repository: Path) -> None:
    app = create_app(Settings(repository=escaping_repository, access_log=False))
    with TestClient(app, raise_server_exceptions=False) as client:
        reason = _index(client)[NAME]["reason"]
    assert re.search(r"external data|outside (of )?the model directory", reason, re.I), (
        f"the reason does not say what is wrong: {reason!r}"
    )


def test_the_external_data_model_itself_is_valid(tmp_path: Path) -> None:
    """Control for the tests above: with its weights inside its own directory the same model
    loads and computes x @ W, so their refusals come from where the data points."""
    model_path = write_external_data_onnx(tmp_path / "model.onnx", "weights.bin")
    (tmp_path / "weights.bin").write_bytes(WEIGHT.astype("<f4").tobytes())
    onnx.checker.check_model(str(model_path))
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = np.arange(2 * FEATURES, dtype=np.float32).reshape(2, FEATURES)
    (scores,) = session.run(None, {"x": x})
    np.testing.assert_allclose(scores, x @ WEIGHT, rtol=1e-6)
