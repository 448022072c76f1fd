"""The batch-statistics export: BatchNorm's training-mode forward as explicit ONNX ops.

On a DigitsCNN with randomized BatchNorms (default statistics would make BatchNorm the
identity and hide a wrong formula), checked against torch's own training-mode BatchNorm.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from export.batchstats import (
    PARITY_BATCHES,
    BatchStatsNorm,
    accuracy_in_batches,
    export_batch_statistics,
    torch_batch_statistics,
    with_batch_statistics,
)
from export.to_onnx import BatchDependentError, ParityError, export_onnx
from models.cnn import DigitsCNN
from models.norms import ReferenceBatchNorm

RandomizeBN = Callable[..., nn.Module]
# onnxruntime vs torch's training-mode BatchNorm: max|Δ| <= PARITY_RTOL * max(1, max|torch|)
# holds on this small CNN (the export tool's own rule is export.parity's).
PARITY_RTOL = 1e-5


@pytest.fixture
def cnn(randomize_bn: RandomizeBN) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(DigitsCNN(width=8, hidden=16), seed=1).eval()


def _digits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("shape", [(5, 6), (3, 4, 5, 5), (2, 3, 7)])
def test_batch_stats_norm_is_torchs_training_forward(
    shape: tuple[int, ...], randomize_bn: RandomizeBN
) -> None:
    bn = randomize_bn(
        {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)](shape[1])
    )
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bn = bn.double()
    ours = BatchStatsNorm(bn)(x)
    torchs = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    torch.testing.assert_close(ours, torchs, rtol=0, atol=1e-12)
    # And the textbook reference of models/norms.py, which uses batch statistics when it
    # tracks none.
    reference = ReferenceBatchNorm(shape[1], eps=bn.eps, track_running_stats=False).double()
    reference.load_state_dict({"weight": bn.weight, "bias": bn.bias})
    torch.testing.assert_close(ours, reference(x), rtol=0, atol=1e-12)


def test_one_value_per_channel_gives_the_bias_whatever_the_input(
    randomize_bn: RandomizeBN,
) -> None:
    bn = randomize_bn(nn.BatchNorm1d(6))
    norm = BatchStatsNorm(bn)
    for seed in range(3):
        x = torch.randn(1, 6, generator=torch.Generator().manual_seed(seed)) * 10
        torch.testing.assert_close(norm(x), bn.bias.detach().reshape(1, -1))


def test_every_batchnorm_is_replaced_on_a_copy(
    cnn: nn.Module, caller_snapshot: Callable[[nn.Module], Callable[[], None]]
) -> None:
    assert_unchanged = caller_snapshot(cnn)
    explicit = with_batch_statistics(cnn)
    assert not [m for m in explicit.modules() if isinstance(m, _BatchNorm)]
    assert sum(isinstance(m, BatchStatsNorm) for m in explicit.modules()) == 4
    assert not explicit.training  # Dropout off
    x = _digits(16)
    with torch.no_grad():
        torch.testing.assert_close(explicit(x), torch_batch_statistics(cnn)(x))
    assert_unchanged()  # running statistics, weights and modes of the caller's model


def test_a_model_without_batchnorm_is_refused() -> None:
    with pytest.raises(ValueError, match="has no BatchNorm"):
        with_batch_statistics(nn.Sequential(nn.Linear(3, 2)))


def test_export_matches_torch_training_batchnorm_and_depends_on_the_batch(
    cnn: nn.Module, tmp_path: Path, caller_snapshot: Callable[[nn.Module], Callable[[], None]]
) -> None:
    assert_unchanged = caller_snapshot(cnn)
    path = tmp_path / "batchstats.onnx"
    samples = _digits(40, seed=5)
    report = export_batch_statistics(
        cnn, samples, path, input_names=["image"], output_names=["logits"]
    )
    assert_unchanged()
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "BatchNormalization" not in ops and "Dropout" not in ops
    assert ops.count("ReduceMean") == 8  # a mean and a variance per BatchNorm
    assert report.bn_folded == 0 and report.batchnorm_nodes == 0
    assert report.parity_batches == [*PARITY_BATCHES, 40]
    assert 0 <= report.parity_max_abs_error <= report.parity_bound
    session = _session(path)
    reference = torch_batch_statistics(cnn)
    for batch in (2, 32):
        x = _digits(batch, seed=batch)
        with torch.no_grad():
            want = reference(x).numpy()
        (got,) = session.run(None, {"image": x.numpy()})
        assert np.max(np.abs(got - want)) <= PARITY_RTOL * max(1.0, float(np.abs(want).max()))
    # Row 0's answer depends on its companions: batch statistics, not running ones.
    a, b, c = _digits(1, 10), _digits(7, 11), _digits(7, 12)
    (with_b,) = session.run(None, {"image": torch.cat([a, b]).numpy()})
    (with_c,) = session.run(None, {"image": torch.cat([a, c]).numpy()})
    assert np.max(np.abs(with_b[0] - with_c[0])) > 1e-3


def test_parity_is_held_against_the_reference_given(cnn: nn.Module, tmp_path: Path) -> None:
    # The explicit graph is not the eval-mode model: against that reference parity fails.
    with pytest.raises(ParityError, match="exceeds the bound"):
        export_onnx(
            with_batch_statistics(cnn),
            _digits(8),
            tmp_path / "wrong.onnx",
            parity_batches=(2, 7),
            parity_reference=cnn.eval(),
        )


def test_ordinary_export_still_refuses_batchnorm_without_running_stats(
    tmp_path: Path, randomize_bn: RandomizeBN
) -> None:
    model = DigitsCNN(width=8, hidden=16)
    model.classifier[2] = nn.BatchNorm1d(16, track_running_stats=False)
    with pytest.raises(BatchDependentError, match="track_running_stats"):
        export_onnx(randomize_bn(model).eval(), _digits(8), tmp_path / "model.onnx")


def test_accuracy_in_batches_never_leaves_a_batch_of_one(cnn: nn.Module) -> None:
    reference = torch_batch_statistics(cnn)
    x = _digits(33)
    with torch.no_grad():
        labels = reference(x).argmax(dim=1)
        per_batch = torch.cat([reference(x[i : i + 11]).argmax(dim=1) for i in (0, 11, 22)])
    # 33 = 32 + 1: the lone last row (torch would refuse it) joins the batch before it.
    assert accuracy_in_batches(cnn, x, labels, 32) == 1.0
    assert accuracy_in_batches(cnn, x, labels, 11) == float((per_batch == labels).double().mean())
