"""A tiny real ONNX model and repository built with onnx.helper (no torch, no training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.repository import ModelConfig, ModelVersion, TensorSpec, install_model, now

FEATURES = 4
CLASSES = 3
WEIGHT = np.arange(FEATURES * CLASSES, dtype=np.float32).reshape(FEATURES, CLASSES) / 10
BIAS = np.array([0.5, -0.5, 0.0], dtype=np.float32)


def expected(x: np.ndarray) -> np.ndarray:
    """What the tiny model computes: x @ W + b, row by row."""
    return x @ WEIGHT + BIAS


def write_tiny_onnx(path: Path) -> Path:
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["scores"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(WEIGHT, "W"), numpy_helper.from_array(BIAS, "B")],
    )
    return save_checked(graph, path)


def install_source(root: Path, source: Path, config: dict[str, object]) -> Path:
    """Install ``source`` as version 1 of ``config`` in ``root/repository``, through the real
    format code (sha256 computed by install_model); the source file is removed."""
    spec = ModelConfig.model_validate(config)
    version = ModelVersion(
        version=1,
        sha256="0" * 64,
        opset=18,
        exported_at=now(),
        parity_max_abs_error=0.0,
        parity_bound=1e-5,
    )
    repository = root / "repository"
    install_model(repository, spec, source, version)
    source.unlink()
    return repository


def tiny_repository(root: Path, name: str = "tiny", **config: object) -> Path:
    """A repository with one tiny classifier."""
    source = write_tiny_onnx(root / f"{name}-source.onnx")
    return install_source(
        root,
        source,
        {
            "name": name,
            "inputs": [TensorSpec(name="x", datatype="FP32", shape=[-1, FEATURES]).model_dump()],
            "outputs": [
                TensorSpec(name="scores", datatype="FP32", shape=[-1, CLASSES]).model_dump()
            ],
            "labels": ["a", "b", "c"],
            "max_batch_size": 8,
            **config,
        },
    )


def centered(x: np.ndarray) -> np.ndarray:
    """What the batch-dependent tiny model computes: each row minus the batch's mean row."""
    return x - x.mean(axis=0, keepdims=True)


def write_batch_mean_onnx(path: Path) -> Path:
    """x - mean(x over the batch axis): every row's output depends on the whole batch."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=1),
            helper.make_node("Sub", ["x", "mean"], ["centered"]),
        ],
        "batch_mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("centered", TensorProto.FLOAT, ["batch", FEATURES])],
        [numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")],
    )
    return save_checked(graph, path)


def batch_mean_repository(root: Path, name: str = "centering", **config: object) -> Path:
    """A repository with one batch-dependent model (``batch_dependent`` as given, else True)."""
    source = write_batch_mean_onnx(root / f"{name}-source.onnx")
    spec = [TensorSpec(name="x", datatype="FP32", shape=[-1, FEATURES]).model_dump()]
    out = [TensorSpec(name="centered", datatype="FP32", shape=[-1, FEATURES]).model_dump()]
    return install_source(
        root,
        source,
        {"name": name, "inputs": spec, "outputs": out, "batch_dependent": True, **config},
    )


def save_checked(graph: onnx.GraphProto, path: Path) -> Path:
    """``graph`` as an opset-18 model that passes the full onnx checker, saved at ``path``."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what onnxruntime 1.x reads
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path
