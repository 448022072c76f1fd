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


# A sequence model with two dynamic axes, [batch, length, FEATURES]: the mean over the length
# axis, then the tiny classifier's x @ W + b. Zero padding moves the mean (it has no mask),
# so an answer computed on a padded batch differs from the request's own.
SEQUENCE_MAX_LENGTH = 16


def sequence_expected(x: np.ndarray) -> np.ndarray:
    """What the sequence model computes for ``x`` [batch, length, FEATURES]."""
    return x.mean(axis=1) @ WEIGHT + BIAS


def write_sequence_onnx(path: Path) -> Path:
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], keepdims=0),
            helper.make_node("MatMul", ["pooled", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["scores"]),
        ],
        "sequence",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "length", FEATURES])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", CLASSES])],
        [
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
            numpy_helper.from_array(WEIGHT, "W"),
            numpy_helper.from_array(BIAS, "B"),
        ],
    )
    return save_checked(graph, path)


def sequence_repository(root: Path, name: str = "sequence", **config: object) -> Path:
    """A repository with the sequence model: input ``x`` [-1, -1, FEATURES], its length
    capped at ``SEQUENCE_MAX_LENGTH`` in config.json."""
    source = write_sequence_onnx(root / f"{name}-source.onnx")
    x = TensorSpec(
        name="x",
        datatype="FP32",
        shape=[-1, -1, FEATURES],
        max_shape=[-1, SEQUENCE_MAX_LENGTH, FEATURES],
    )
    out = TensorSpec(name="scores", datatype="FP32", shape=[-1, CLASSES])
    return install_source(
        root,
        source,
        {
            "name": name,
            "inputs": [x.model_dump()],
            "outputs": [out.model_dump()],
            "max_batch_size": 8,
            **config,
        },
    )


def save_checked(graph: onnx.GraphProto, path: Path) -> Path:
    """``graph`` as an opset-18 model that passes the full onnx checker, saved at ``path``."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what onnxruntime 1.x reads
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


# Triton's example models, as its Python client examples expect them (simple_http_infer_client
# and friends): INPUT0 and INPUT1 of 16 elements per row, OUTPUT0 = INPUT0 + INPUT1 and
# OUTPUT1 = INPUT0 - INPUT1, max_batch_size 8. `simple` holds INT32; `simple_string` holds
# the same numbers as decimal text (BYTES), parsed and printed by Cast nodes. torch cannot
# express string tensors, hence onnx.helper.
EXAMPLE_WIDTH = 16


def write_simple_onnx(path: Path, element: int = TensorProto.INT32) -> Path:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1; strings parsed as INT32."""
    text = element == TensorProto.STRING
    nodes = []
    a, b = "INPUT0", "INPUT1"
    if text:
        nodes += [
            helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
            helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32),
        ]
        a, b = "a", "b"
    total, difference = ("sum", "difference") if text else ("OUTPUT0", "OUTPUT1")
    nodes += [
        helper.make_node("Add", [a, b], [total]),
        helper.make_node("Sub", [a, b], [difference]),
    ]
    if text:
        nodes += [
            helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=TensorProto.STRING),
            helper.make_node("Cast", ["difference"], ["OUTPUT1"], to=TensorProto.STRING),
        ]

    def value(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, element, ["batch", EXAMPLE_WIDTH])

    graph = helper.make_graph(
        nodes,
        "simple_string" if text else "simple",
        [value("INPUT0"), value("INPUT1")],
        [value("OUTPUT0"), value("OUTPUT1")],
    )
    return save_checked(graph, path)


def write_identity_onnx(path: Path) -> Path:
    """Triton's ``simple_identity``: OUTPUT0 = INPUT0, 16 strings a row."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "simple_identity",
        [helper.make_tensor_value_info("INPUT0", TensorProto.STRING, ["batch", EXAMPLE_WIDTH])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.STRING, ["batch", EXAMPLE_WIDTH])],
    )
    return save_checked(graph, path)


def triton_examples_repository(root: Path) -> Path:
    """A repository with Triton's ``simple`` (INT32), ``simple_string`` and
    ``simple_identity`` (BYTES)."""
    repository = root / "repository"
    identity = write_identity_onnx(root / "simple_identity-source.onnx")
    width = [-1, EXAMPLE_WIDTH]
    install_source(
        root,
        identity,
        {
            "name": "simple_identity",
            "inputs": [TensorSpec(name="INPUT0", datatype="BYTES", shape=width).model_dump()],
            "outputs": [TensorSpec(name="OUTPUT0", datatype="BYTES", shape=width).model_dump()],
            "max_batch_size": 8,
        },
    )
    for name, element, datatype in (
        ("simple", TensorProto.INT32, "INT32"),
        ("simple_string", TensorProto.STRING, "BYTES"),
    ):
        source = write_simple_onnx(root / f"{name}-source.onnx", element)

        def specs(*names: str, datatype: str = datatype) -> list[dict[str, object]]:
            shape = [-1, EXAMPLE_WIDTH]
            return [TensorSpec(name=n, datatype=datatype, shape=shape).model_dump() for n in names]

        repository = install_source(
            root,
            source,
            {
                "name": name,
                "inputs": specs("INPUT0", "INPUT1"),
                "outputs": specs("OUTPUT0", "OUTPUT1"),
                "max_batch_size": 8,
                "description": f"Triton's example model '{name}' (sum and difference)",
            },
        )
    return repository
