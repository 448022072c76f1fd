"""The fold on real timm and torchvision architectures: where the default exporter stops.

Random init (nothing is downloaded; ``real_models`` makes torchvision importable beside the
CPU torch by defining the two op schemas its import needs), realistic BatchNorm statistics
(measured in train mode on random batches, then perturbed), small inputs to keep the run short.
``torch.onnx.export(dynamo=True)`` leaves BatchNormalization nodes on DenseNet-121 (62),
LeViT-128S (48), RepVGG-A0 (17) and MaxViT-T (11), and with ``optimize=False`` every one of
timm's ``BatchNormAct2d`` (49 on EfficientNet-B0). Here each folds, or is kept with the reason.

Numbers: the folded float32 model is compared with the float64 eval model, relative to how
far PyTorch's own float32 eval output is from it (deep networks lose ~1e-5 relative to
float32 rounding; a wrong fold moves outputs by O(1)).
"""

from __future__ import annotations

import collections
import copy
import functools
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from export import FoldReport, fold_batchnorm_with_report
from export.fold_norms import FoldedBatchNorm, MergedBranch, is_norm

real_models = pytest.importorskip("real_models")
if importlib.util.find_spec("timm") is None:  # imported through real_models, after the shim
    pytest.skip("timm is not installed: pip install -e '.[export,dev]'", allow_module_level=True)

BATCH = 2
# The folded float32 output may be this many times further from the float64 truth than
# PyTorch's own float32 output, plus a floor relative to the output's magnitude.
ERROR_FACTOR = 4.0
ERROR_FLOOR = 1e-6
# Calibration for realistic statistics: small, the numbers only need to be plausible.
CALIBRATION = {"batches": 2, "batch_size": 4}


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    side: int
    folded: int
    kept: int
    how: dict[str, int]
    merged: int = 0
    # What the trial measured: BatchNormalization nodes left by the default exporter.
    dynamo_leaves: int = 0


def small_maxvit() -> nn.Module:
    """torchvision's MaxViT, 2 stages of 1 block: the MBConv pre-norm of MaxViT-T, smaller."""
    real_models.import_torchvision()
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(real_models.SEED)
    model = MaxVit(
        input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[16, 32],
        block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10,
    )  # fmt: skip
    return model.eval()


CASES = {
    "efficientnet_b0": Case(
        lambda: real_models.timm_model("efficientnet_b0"), 32, 49, 0, {"after": 49}
    ),
    "levit_128s": Case(
        lambda: real_models.timm_model("levit_128s", img_size=64),
        64,
        52,
        0,
        {"after": 50, "before": 2},
        dynamo_leaves=48,
    ),
    "densenet121": Case(
        lambda: real_models.torchvision_model("densenet121"),
        32,
        59,
        62,
        {"after": 59},
        dynamo_leaves=62,
    ),
    "repvgg_a0": Case(
        lambda: real_models.timm_model("repvgg_a0"),
        32,
        61,
        0,
        {"after": 44, "merged": 17},
        merged=22,
        dynamo_leaves=17,
    ),
    # The default exporter leaves the MBConv pre-norms: 2 here, 11 on MaxViT-T.
    "maxvit_small": Case(small_maxvit, 32, 7, 0, {"after": 5, "before": 2}, dynamo_leaves=2),
}


@functools.cache
def calibrated(name: str) -> nn.Module:
    case = CASES[name]
    model = case.build()
    return real_models.realistic_batchnorm(model, (3, case.side, case.side), **CALIBRATION)


@functools.cache
def folded_model(name: str) -> tuple[nn.Module, FoldReport, torch.Tensor]:
    case = CASES[name]
    x = torch.randn(BATCH, 3, case.side, case.side, generator=torch.Generator().manual_seed(1))
    folded, report = fold_batchnorm_with_report(calibrated(name), x)
    return folded, report, x


@pytest.mark.parametrize("name", list(CASES))
def test_real_architecture_folds_past_the_default_exporter(
    name: str, caller_snapshot: Callable[[nn.Module], Callable[[], None]]
) -> None:
    case = CASES[name]
    model = calibrated(name)
    assert_unchanged = caller_snapshot(model)
    folded, report, x = folded_model(name)
    assert_unchanged()

    assert (len(report.folded), len(report.kept)) == (case.folded, case.kept), report.kept
    assert dict(collections.Counter(report.how.values())) == case.how
    assert len(report.merged) == case.merged
    left = [m for m in folded.modules() if is_norm(m)]
    assert len(left) == case.kept
    # Never more than the default exporter leaves; where as many (DenseNet), each has a reason.
    assert case.kept <= case.dynamo_leaves

    with torch.no_grad():
        truth = copy.deepcopy(model).double()(x.double())
        torch_error = float((model(x).double() - truth).abs().max())
        fold_error = float((folded(x).double() - truth).abs().max())
    magnitude = float(truth.abs().max())
    # Realistic statistics: the outputs vary with the input, so a lost BatchNorm would show.
    assert float(truth.std(dim=0).max()) > 1e-3 * max(1.0, magnitude)
    assert fold_error <= ERROR_FACTOR * torch_error + ERROR_FLOOR * max(1.0, magnitude), (
        f"folded {fold_error:.2e} vs torch fp32 {torch_error:.2e} (max|ref| {magnitude:.2e})"
    )


def test_densenet_keeps_exactly_the_batchnorms_after_concatenation_then_relu() -> None:
    """DenseNet normalizes each concatenation, then ReLU (in place), then convolves: no layer
    on either side can take the map. Every kept one says so; the others all fold."""
    _, report, _ = folded_model("densenet121")
    assert report.kept
    for name, reason in report.kept.items():
        assert name.endswith(("norm1", "norm", "norm5")), name
        assert "the output of 'cat'" in reason or "a concatenation ('cat')" in reason, reason
        assert "goes through 'relu' (in place)" in reason, reason
    assert all(name.endswith(("norm0", "norm2")) for name in report.folded)


def test_timm_batchnorm_act_keeps_its_activation_and_exports_without_batchnorm_nodes() -> None:
    """EfficientNet-B0's 49 BatchNormAct2d fold into their convs; the SiLU of each stays.
    Exported without onnxscript's optimizer, the file has no BatchNormalization node."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model = calibrated("efficientnet_b0")
    folded, _, x = folded_model("efficientnet_b0")
    assert not any(m.training for m in folded.modules())

    def silu_count(m: nn.Module) -> int:
        return sum(type(s) is nn.SiLU for s in m.modules())

    assert silu_count(folded) == silu_count(model) > 0
    replaced = [m for m in folded.modules() if isinstance(m, FoldedBatchNorm)]
    assert len(replaced) == 49
    assert sum(type(m.act) is nn.SiLU for m in replaced) > 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(folded, (x,), dynamo=True, optimize=False, verbose=False)
    ops = collections.Counter(node.op_type for node in program.model_proto.graph.node)
    assert ops["BatchNormalization"] == 0
    assert ops["Conv"] >= 49
    onnx.checker.check_model(program.model_proto)


def test_repvgg_becomes_one_conv_per_block() -> None:
    """RepVGG-A0: every block's 1x1 branch merges into its 3x3 conv and each identity
    BatchNorm with it, so one convolution per block runs. The default exporter's optimizer
    drops the absorbed branches' ``+ 0``: the file is 22 Conv and nothing else on that path
    (unfolded, the same exporter writes 44 Conv, 17 BatchNormalization and 39 Add)."""
    pytest.importorskip("onnxscript")
    folded, report, x = folded_model("repvgg_a0")
    assert len(report.merged) == 22
    for branch, into in report.merged.items():
        assert branch.endswith("conv_1x1.conv") and into.endswith("conv_kxk.conv"), branch
    merged_norms = [n for n, how in report.how.items() if how == "merged"]
    assert len(merged_norms) == 17 and all(n.endswith(".identity") for n in merged_norms)
    convs = [m for m in folded.modules() if type(m) is nn.Conv2d]
    assert len(convs) == 22  # 22 blocks, one 3x3 conv each
    assert sum(isinstance(m, MergedBranch) for m in folded.modules()) == 22 + 17

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(folded, (x,), dynamo=True, verbose=False)
    ops = collections.Counter(node.op_type for node in program.model_proto.graph.node)
    assert (ops["Conv"], ops["BatchNormalization"], ops["Add"]) == (22, 0, 0), ops
