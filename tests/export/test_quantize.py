"""``python -m export quantize``: an int8 copy of a published model, gated on accuracy.

Real data (the digits split), real quantizer, real onnxruntime; the repository is a copy of
the session's freshly built one, so each test starts from the fp32 models alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_runner import run_cli_in_process

from export.quantize import QuantizationError, quantize_published
from models.data import load_digits_split
from service.repository import read_config, verified_file
from service.serving.runtime import OnnxModel, SessionOptions


@pytest.fixture
def repository(model_copies: Callable[..., Path]) -> Path:
    return model_copies("digits_cnn", "digits_transformer")


def _served(repository: Path, name: str) -> OnnxModel:
    config = read_config(repository / name / "config.json")
    path = verified_file(repository, config, config.latest)
    return OnnxModel(config, config.latest, path, SessionOptions(intra_op_threads=1))


def test_int8_cnn_is_published_with_its_evidence_and_served(repository: Path) -> None:
    config, report = quantize_published(repository, "digits_cnn")

    assert config.name == "digits_cnn_int8"
    version = config.latest
    assert version.precision == "int8"
    fp32 = read_config(repository / "digits_cnn" / "config.json").latest
    assert fp32.precision == "fp32"
    # The gate it passed is recorded, and it is the gate of the issue: within 0.5 points.
    metrics = version.metrics
    assert metrics["fp32_test_accuracy"] - metrics["test_accuracy"] <= 0.005
    assert metrics["top1_agreement_with_fp32"] >= 0.99
    assert 0 < version.parity_max_abs_error <= version.parity_bound
    assert report.quantized_weights >= 4  # three convolutions and two linear layers

    # The file really is int8, says so in its metadata, and the service loads and runs it.
    proto = onnx.load(str(verified_file(repository, config, version)))
    assert any(t.data_type == onnx.TensorProto.INT8 for t in proto.graph.initializer)
    assert {p.key: p.value for p in proto.metadata_props}["normserve.precision"] == "int8"
    # The first convolution (1 channel, 9-term dot products) stays fp32, the others do not.
    floats = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert [n.input[0] for n in convs if n.input[1] in floats] == ["image"]
    assert sum(n.input[1] not in floats for n in convs) == 2
    int8, reference = _served(repository, "digits_cnn_int8"), _served(repository, "digits_cnn")
    test = load_digits_split().test
    images = test.images.numpy().reshape(-1, 1, 8, 8)[:64]
    got = int8.run({"image": images})["logits"]
    want = reference.run({"image": images})["logits"]
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.98
    assert np.mean(got.argmax(1) == test.labels.numpy()[:64]) >= 0.95
    assert np.abs(got - want).max() <= version.parity_bound


def test_transformer_quantizes_its_matmuls_and_keeps_layernorm(repository: Path) -> None:
    config, report = quantize_published(repository, "digits_transformer", new_name="tf8")

    assert config.name == "tf8" and report.agreement >= 0.99
    proto = onnx.load(str(verified_file(repository, config, config.latest)))
    ops = {n.op_type for n in proto.graph.node}
    assert "LayerNormalization" in ops and "DequantizeLinear" in ops


def test_a_gate_that_fails_publishes_nothing(repository: Path) -> None:
    # Demanding a 1-point gain: no int8 model can pass, so the refusal path runs for real.
    with pytest.raises(QuantizationError, match="points below fp32"):
        quantize_published(repository, "digits_cnn", max_drop_points=-1.0)
    assert not (repository / "digits_cnn_int8").exists()


def test_int8_models_are_not_quantized_again(repository: Path) -> None:
    quantize_published(repository, "digits_cnn")
    with pytest.raises(QuantizationError, match="already int8"):
        quantize_published(repository, "digits_cnn_int8")


def test_batch_dependent_models_are_refused(model_copies: Callable[..., Path]) -> None:
    repository = model_copies("digits_cnn_batchstats")
    with pytest.raises(QuantizationError, match="batch-dependent"):
        quantize_published(repository, "digits_cnn_batchstats")
    assert not (repository / "digits_cnn_batchstats_int8").exists()


def test_cli_prints_the_evidence_and_refuses_unknown_models(repository: Path) -> None:
    ok = run_cli_in_process(repository.parent, "quantize", "--model", "digits_cnn",
                            "--repository", str(repository))  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "top-1 agreement" in ok.stdout and "digits_cnn_int8 version 1" in ok.stdout

    missing = run_cli_in_process(repository.parent, "quantize", "--model", "nope",
                                 "--repository", str(repository))  # fmt: skip
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: ") and "nope" in missing.stderr
    assert "Traceback" not in missing.stderr
