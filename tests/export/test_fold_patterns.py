"""The fold's wider cases on hand-made modules: known BatchNorm classes, reshapes between the
layer and the BatchNorm, BatchNorm before a layer, and parallel branches merged into one conv.

Each foldable case is checked twice: folded in float64 against the float64 eval model (exact:
only the order of float64 operations differs), and folded in float32 against the same float64
reference (float32 rounding). Each case that must stay is kept with its reason and the output
is the eval model's, bit for bit. The caller's model never changes.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from export import fold_batchnorm_with_report
from export.fold import fold_weights_before
from export.fold_norms import FoldedBatchNorm, MergedBranch, is_norm

# Folded float64 model vs the float64 eval model, relative to the output's magnitude.
FLOAT64_RTOL = 1e-12
# Folded float32 model vs the float64 eval model: these models are a few layers deep.
FLOAT32_RTOL = 1e-5
SEED = 0


def bound(reference: torch.Tensor, rtol: float) -> float:
    return rtol * max(1.0, float(reference.detach().abs().max()))


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max())


def norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_norm(m)]


def randomize(model: nn.Module) -> nn.Module:
    """Random statistics and affine maps on every BatchNorm-like module (frozen ones too)."""
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for m in norms(model):
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.empty(n).uniform_(0.2, 3.0, generator=g))
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.empty(n).uniform_(-2.0, 2.0, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model


def check_folds_exactly(
    model: nn.Module,
    x: torch.Tensor,
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> tuple[nn.Module, Any]:
    """Fold ``model`` in float32 and a float64 copy of it; both match the float64 eval model."""
    model = randomize(model).train()
    assert_unchanged = caller_snapshot(model)
    folded, report = fold_batchnorm_with_report(model, x)
    assert_unchanged()
    assert model.training
    double = copy.deepcopy(model).double()
    folded64, report64 = fold_batchnorm_with_report(double, x.double())
    assert report64 == report
    with torch.no_grad():
        reference = copy.deepcopy(double).eval()(x.double())
        assert max_error(folded64(x.double()), reference) <= bound(reference, FLOAT64_RTOL)
        assert max_error(folded(x), reference) <= bound(reference, FLOAT32_RTOL)
        # Another batch size, which the fold never saw.
        x2 = torch.randn(1, *x.shape[1:], dtype=torch.float64)
        reference2 = copy.deepcopy(double).eval()(x2)
        assert max_error(folded64(x2), reference2) <= bound(reference2, FLOAT64_RTOL)
    return folded, report


def check_kept(
    model: nn.Module,
    x: torch.Tensor,
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
    reason_parts: list[str],
) -> Any:
    model = randomize(model).train()
    assert_unchanged = caller_snapshot(model)
    folded, report = fold_batchnorm_with_report(model, x)
    assert_unchanged()
    assert report.folded == {}
    assert list(report.kept) == ["bn"]
    for part in reason_parts:
        assert part in report.kept["bn"], report.kept["bn"]
    assert len(norms(folded)) == 1
    for name, param in model.named_parameters():
        assert torch.equal(folded.get_parameter(name), param), name
    with torch.no_grad():
        assert torch.equal(folded(x), copy.deepcopy(model).eval()(x))
    return report


# ---------------------------------------------------------------------------- the math


@pytest.mark.parametrize(
    ("weight_shape", "groups"),
    [
        pytest.param((6, 4), 1, id="linear"),
        pytest.param((6, 4, 1, 1), 1, id="conv1x1"),
        pytest.param((6, 2, 3, 3), 2, id="conv3x3-groups2"),
        pytest.param((4, 1, 3), 4, id="depthwise1d"),
        pytest.param((6, 4, 2, 3, 2), 1, id="conv3d"),
    ],
)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_fold_weights_before_matches_a_float64_batchnorm_then_layer(
    weight_shape: tuple[int, ...], groups: int, with_bias: bool, affine: bool
) -> None:
    g = torch.Generator().manual_seed(SEED)
    f64 = torch.float64
    weight = torch.randn(weight_shape, generator=g, dtype=f64)
    out_channels, in_channels = weight_shape[0], weight_shape[1] * groups
    bias = torch.randn(out_channels, generator=g, dtype=f64) if with_bias else None
    mean = torch.randn(in_channels, generator=g, dtype=f64)
    var = torch.empty(in_channels, dtype=f64).uniform_(0.1, 3, generator=g)
    gamma = torch.empty(in_channels, dtype=f64).uniform_(-2, 2, generator=g) if affine else None
    beta = torch.randn(in_channels, generator=g, dtype=f64) if affine else None
    eps = 1e-3
    kernel = weight_shape[2:]
    x = torch.randn(3, in_channels, *[k + 3 for k in kernel], generator=g, dtype=f64)
    shape = (1, -1, *([1] * len(kernel)))
    normalized = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)
    if affine:
        normalized = normalized * gamma.reshape(shape) + beta.reshape(shape)

    def layer(inp: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if not kernel:
            return F.linear(inp, w, b)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
        return conv(inp, w, b, groups=groups)

    new_weight, new_bias = fold_weights_before(
        weight, bias, mean, var, eps, gamma, beta, groups=groups
    )
    expected = layer(normalized, weight, bias)
    actual = layer(x, new_weight, new_bias)
    assert max_error(actual, expected) <= bound(expected, FLOAT64_RTOL)
    assert new_weight.shape == weight.shape and new_bias.shape == (out_channels,)


# ---------------------------------------------------------------------------- known classes


def timm_norm_act() -> Any:
    real_models = pytest.importorskip("real_models")
    return real_models.import_timm().layers.norm_act


class ConvThen(nn.Module):
    def __init__(self, bn: nn.Module, channels: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


@pytest.mark.parametrize(
    ("make_bn", "act_kind"),
    [
        pytest.param(
            lambda t: t.BatchNormAct2d(6, act_layer=nn.SiLU, drop_layer=nn.Dropout),
            nn.SiLU,
            id="timm-BatchNormAct2d-silu-dropout",
        ),
        pytest.param(lambda t: t.BatchNormAct2d(6, apply_act=False), nn.Identity, id="no-act"),
        pytest.param(
            lambda t: t.FrozenBatchNormAct2d(6, act_layer=nn.ReLU), nn.ReLU, id="timm-frozen-act"
        ),
        pytest.param(lambda t: t.FrozenBatchNorm2d(6), None, id="torchvision-FrozenBatchNorm2d"),
    ],
)
def test_known_batchnorm_class_folds_and_keeps_its_activation(
    make_bn: Callable[[Any], nn.Module],
    act_kind: type[nn.Module] | None,
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    model = ConvThen(make_bn(timm_norm_act()))
    x = torch.randn(2, 3, 8, 8)

    folded, report = check_folds_exactly(model, x, caller_snapshot)

    assert report.folded == {"bn": ["conv"]} and report.kept == {}
    assert norms(folded) == []
    assert isinstance(folded.bn, FoldedBatchNorm)
    if act_kind is None:
        assert folded.bn.act is None
    else:
        assert type(folded.bn.act) is act_kind
    # The activation really runs: a negative pre-activation comes out changed where it must.
    if act_kind in (nn.SiLU, nn.ReLU):
        with torch.no_grad():
            assert (folded(x) < 0).sum() == 0 if act_kind is nn.ReLU else folded(x).min() > -0.3


class OverridingBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_unknown_batchnorm_subclass_is_kept(
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    check_kept(
        ConvThen(OverridingBN(6)),
        torch.randn(2, 3, 8, 8),
        caller_snapshot,
        ["overrides forward() (OverridingBN)"],
    )


def test_subclass_of_a_known_class_is_unknown(
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    """Known classes match by exact name: a subclass may compute anything."""
    norm_act = timm_norm_act()

    class Doubled(norm_act.BatchNormAct2d):  # type: ignore[misc, name-defined]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    check_kept(
        ConvThen(Doubled(6)), torch.randn(2, 3, 8, 8), caller_snapshot, ["overrides forward()"]
    )


# ---------------------------------------------------------------------------- reshapes


class LinearFlattenBN(nn.Module):
    """LeViT's LinearNorm: BatchNorm1d over the tokens of all images at once."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6, bias=False)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class ConvFlattenBN1d(nn.Module):
    """Conv output [B, C, H, W] flattened to [B, C, H·W]: BatchNorm1d still sees channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x).flatten(2).contiguous())


class LinearViewBN2d(nn.Module):
    """Linear output [B, C] viewed as [B, C, 1, 1] for a BatchNorm2d."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x).view(-1, 6, 1, 1).clone())


class ConvPoolBN1d(nn.Module):
    """conv → global average → flatten → BatchNorm1d: the average commutes with the map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.adaptive_avg_pool2d(self.conv(x), 1).flatten(1))


@pytest.mark.parametrize(
    ("model_class", "shape"),
    [
        pytest.param(LinearFlattenBN, (3, 5, 4), id="levit-linear-flatten-bn1d"),
        pytest.param(ConvFlattenBN1d, (2, 4, 7, 8), id="conv-flatten-bn1d"),
        pytest.param(LinearViewBN2d, (5, 4), id="linear-view-bn2d"),
        pytest.param(ConvPoolBN1d, (2, 4, 7, 8), id="conv-global-pool-bn1d"),
    ],
)
def test_batchnorm_through_feature_keeping_reshapes_folds(
    model_class: type[nn.Module],
    shape: tuple[int, ...],
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    folded, report = check_folds_exactly(model_class(), torch.randn(shape), caller_snapshot)
    assert list(report.folded) == ["bn"] and report.how == {"bn": "after"}
    assert norms(folded) == []


class LinearReshapeAcross(nn.Module):
    """[B, N, C] reshaped to [B, C, N] with N == C: every shape fits, the features do not."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.reshape(y.shape[0], 6, 6))


class LinearTransposeBN(nn.Module):
    """A transpose is not a relabelling in memory order: refused, not reasoned about."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x).transpose(1, 2))


class ReshapedOutputReadTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.linear(x).flatten(0, 1)
        return self.bn(flat) + flat


@pytest.mark.parametrize(
    ("model_class", "reason_parts"),
    [
        pytest.param(LinearReshapeAcross, ["normalizes axis 1", "last axis"], id="reshape-across"),
        pytest.param(LinearTransposeBN, ["'transpose'"], id="transpose"),
        pytest.param(
            ReshapedOutputReadTwice,
            ["shares a reshaped or averaged output of 'linear'"],
            id="read-twice",
        ),
    ],
)
def test_reshape_that_loses_the_feature_axis_is_kept(
    model_class: type[nn.Module],
    reason_parts: list[str],
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    check_kept(model_class(), torch.randn(3, 6, 4), caller_snapshot, reason_parts)


# ---------------------------------------------------------------------------- before a layer


class BNThen(nn.Module):
    """BatchNorm on the model input (nothing to fold into before it), then ``after``."""

    def __init__(self, bn: nn.Module, after: nn.Module, between: nn.Module | None = None) -> None:
        super().__init__()
        self.bn = bn
        self.between = between if between is not None else nn.Identity()
        self.after = after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.between(self.bn(x)))


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


IMAGE = (2, 4, 7, 8)
BEFORE_CASES = [
    pytest.param(lambda: BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1)), IMAGE, id="conv1x1"),
    pytest.param(lambda: BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3)), IMAGE, id="conv3x3-pad0"),
    pytest.param(
        lambda: BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False)),
        IMAGE,
        id="conv-stride2-groups2",
    ),
    pytest.param(
        lambda: BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=4, dilation=2)),
        IMAGE,
        id="depthwise-dilated",
    ),
    pytest.param(
        lambda: BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")),
        IMAGE,
        id="reflect-padding",
    ),
    pytest.param(lambda: BNThen(nn.BatchNorm1d(4), nn.Linear(4, 6)), (5, 4), id="linear"),
    pytest.param(
        lambda: BNThen(nn.BatchNorm1d(4), nn.Linear(4, 6), nn.Dropout(0.5)),
        (5, 4),
        id="dropout-between",
    ),
    pytest.param(
        lambda: BNThen(nn.BatchNorm2d(4), nn.Linear(4, 3), Flatten()),
        (5, 4, 1, 1),
        id="flatten-then-linear",
    ),
    pytest.param(
        lambda: BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.AvgPool2d(2, ceil_mode=True)),
        IMAGE,
        id="avg-pool-then-conv",  # CoAtNet's pre-norm, downsampled by pooling
    ),
    pytest.param(
        lambda: BNThen(
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 6, 1),
            nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        ),
        IMAGE,
        id="padded-avg-pool-not-counting-the-pad",
    ),
    pytest.param(
        lambda: BNThen(
            nn.BatchNorm2d(4),
            nn.Linear(4, 3),
            nn.Sequential(nn.AdaptiveAvgPool2d(1), Flatten()),
        ),
        IMAGE,
        id="global-pool-then-linear",
    ),
]


@pytest.mark.parametrize(("make_model", "shape"), BEFORE_CASES)
def test_batchnorm_before_a_layer_folds_into_it(
    make_model: Callable[[], nn.Module],
    shape: tuple[int, ...],
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    folded, report = check_folds_exactly(make_model(), torch.randn(shape), caller_snapshot)
    assert report.folded == {"bn": ["after"]} and report.how == {"bn": "before"}
    assert report.kept == {}
    assert norms(folded) == []


class ReadTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.after = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        return self.after(y) + y


class TimmPreNormWithAct(nn.Module):
    """A known class with an activation: its output is not the affine map's."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = timm_norm_act().BatchNormAct2d(4, act_layer=nn.ReLU)
        self.after = nn.Conv2d(4, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.bn(x))


KEPT_BEFORE = [
    pytest.param(
        lambda: BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)),
        ["pads with zeros", "padding=(1, 1)", "reads the output of 'a model input'"],
        id="zero-padding",
    ),
    pytest.param(
        lambda: BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.ReLU()),
        ["its output goes to 'relu' before any layer"],
        id="relu-between",
    ),
    pytest.param(
        lambda: BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.ReLU(inplace=True)),
        ["goes through 'relu' (in place) before 'conv2d' reads it"],
        id="inplace-relu-between",
    ),
    pytest.param(ReadTwice, ["its output is read by 2 operations"], id="output-read-twice"),
    pytest.param(
        lambda: BNThen(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 1)),
        ["transposed convolution"],
        id="conv-transpose",
    ),
    pytest.param(TimmPreNormWithAct, ["applies ReLU after normalizing"], id="known-class-act"),
    pytest.param(
        lambda: BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.AvgPool2d(3, padding=1)),
        ["its output goes to 'avg_pool2d' before any layer"],
        id="avg-pool-counting-zero-pad",
    ),
]
KEPT_BEFORE_SHAPED = [
    # BatchNorm1d on [N, C, L] normalizes C; a Linear reads L. C == L: every shape fits.
    pytest.param(
        lambda: BNThen(nn.BatchNorm1d(4), nn.Linear(4, 3)),
        (5, 4, 4),
        ["does not hold the normalized channels on its feature axis"],
        id="linear-on-another-axis",
    ),
]


@pytest.mark.parametrize(("make_model", "reason_parts"), KEPT_BEFORE)
def test_batchnorm_before_a_layer_is_kept_where_inexact(
    make_model: Callable[[], nn.Module],
    reason_parts: list[str],
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    check_kept(make_model(), torch.randn(IMAGE), caller_snapshot, reason_parts)


@pytest.mark.parametrize(("make_model", "shape", "reason_parts"), KEPT_BEFORE_SHAPED)
def test_batchnorm_before_a_layer_reading_another_axis_is_kept(
    make_model: Callable[[], nn.Module],
    shape: tuple[int, ...],
    reason_parts: list[str],
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    check_kept(make_model(), torch.randn(shape), caller_snapshot, reason_parts)


def test_padding_is_why_the_fold_refuses_it() -> None:
    """Folding anyway into a zero-padded conv (by hand) really is wrong at the borders."""
    torch.manual_seed(SEED)
    model = randomize(BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1))).eval()
    x = torch.randn(IMAGE)
    naive = copy.deepcopy(model)
    bn = naive.bn
    w, b = fold_weights_before(
        naive.after.weight, naive.after.bias, bn.running_mean, bn.running_var, bn.eps,
        bn.weight, bn.bias,
    )  # fmt: skip
    naive.after.weight, naive.after.bias = nn.Parameter(w), nn.Parameter(b)
    naive.bn = nn.Identity()
    with torch.no_grad():
        error = (naive(x) - model(x)).abs()
    assert float(error[..., 1:-1, 1:-1].max()) < 1e-4  # the interior is right
    assert float(error.max()) > 1e-2  # the border is not


# ---------------------------------------------------------------------------- parallel branches


class RepBlock(nn.Module):
    """RepVGG's training-time block: conv3x3+BN ∥ conv1x1+BN ∥ BN, summed."""

    def __init__(self, channels: int = 4, groups: int = 1, dilation: int = 1) -> None:
        super().__init__()
        kw = {"groups": groups, "bias": False}
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, **kw)
        self.bn3 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, **kw)
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.bn(x)
        y = self.bn1(self.conv1(x)) + self.bn3(self.conv3(x))
        y += identity  # timm's RepVggBlock adds the identity in place
        return F.relu(y)


class TwoRepBlocks(nn.Module):
    def __init__(self, groups: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.a = RepBlock(groups=groups, dilation=dilation)
        self.b = RepBlock(groups=groups, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


@pytest.mark.parametrize(
    ("groups", "dilation"),
    [
        pytest.param(1, 1, id="dense"),
        pytest.param(2, 1, id="groups2"),
        pytest.param(1, 2, id="dil2"),
    ],
)
def test_parallel_branches_merge_into_one_conv(
    groups: int, dilation: int, caller_snapshot: Callable[[nn.Module], Callable[[], None]]
) -> None:
    torch.manual_seed(SEED)
    folded, report = check_folds_exactly(
        TwoRepBlocks(groups, dilation), torch.randn(2, 4, 7, 8), caller_snapshot
    )
    assert report.kept == {}
    assert report.how["a.bn"] == "merged" and report.folded["a.bn"] == ["a.conv3"]
    assert report.merged == {"a.conv1": "a.conv3", "b.conv1": "b.conv3"}
    assert norms(folded) == []
    assert isinstance(folded.a.conv1, MergedBranch) and isinstance(folded.a.bn, MergedBranch)
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2


class BranchReadTwice(RepBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.bn(x)
        one = self.bn1(self.conv1(x))
        y = one + self.bn3(self.conv3(x)) + identity
        return y * one


class BranchShapeRead(RepBlock):
    """Reads a branch's shape after the sum: a merged branch (a zero scalar) would break it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.bn(x)
        one = self.bn1(self.conv1(x))
        y = one + self.bn3(self.conv3(x)) + identity
        return y.reshape(one.shape[0], -1)


def test_branch_read_outside_the_sum_is_not_merged(
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    _, report = check_folds_exactly(BranchReadTwice(), torch.randn(2, 4, 7, 8), caller_snapshot)
    assert list(report.kept) == ["bn"]
    assert "cannot become one convolution" in report.kept["bn"]
    assert "also read by 1 other operation" in report.kept["bn"]
    assert report.merged == {}


def test_merge_that_changes_the_output_is_undone(
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    folded, report = check_folds_exactly(
        BranchShapeRead(), torch.randn(2, 4, 7, 8), caller_snapshot
    )
    assert report.merged == {}
    assert list(report.kept) == ["bn"]
    assert "changed the model's output on the example input" in report.kept["bn"]
    assert not any(isinstance(m, MergedBranch) for m in folded.modules())


def test_batchnorms_on_both_sides_of_one_conv_both_fold(
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
    folded, report = check_folds_exactly(model, torch.randn(IMAGE), caller_snapshot)
    assert report.folded == {"0": ["1"], "2": ["1"]}
    assert report.how == {"0": "before", "2": "after"}
    assert norms(folded) == []
    assert "which read its output" in repr(folded[0])


def test_frozen_batchnorm_broadcasting_a_rank2_input_is_kept(
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    """torchvision's FrozenBatchNorm2d on [N, C] broadcasts to [1, C, N, C]: not a map of x."""
    frozen = timm_norm_act().FrozenBatchNorm2d(4)
    check_kept(
        BNThen(frozen, nn.Linear(4, 3)), torch.randn(4, 4), caller_snapshot, ["another shape"]
    )


class MobileOneBlock(nn.Module):
    """timm's MobileOne: the sum starts from one branch (or from 0) and grows with ``+=``."""

    def __init__(self, start_with_scale: bool) -> None:
        super().__init__()
        self.scale = (
            nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
            if start_with_scale
            else None
        )
        self.kxk = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
            for _ in range(2)
        )
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = self.bn(x)
        out: Any = self.scale(x) if self.scale is not None else 0
        for branch in self.kxk:
            out += branch(x)
        out += identity_out
        return F.relu(out)


@pytest.mark.parametrize("start_with_scale", [True, False], ids=["from-scale-branch", "from-0"])
def test_sum_grown_in_place_merges_where_the_in_place_target_was(
    start_with_scale: bool, caller_snapshot: Callable[[nn.Module], Callable[[], None]]
) -> None:
    """``out = scale(x); out += kxk(x)`` changes scale's output in place, so the merged 3x3
    conv must run at scale's place: a zero scalar there could not take the ``+=``."""
    torch.manual_seed(SEED)
    model = nn.Sequential(MobileOneBlock(start_with_scale), MobileOneBlock(start_with_scale))
    folded, report = check_folds_exactly(model, torch.randn(2, 4, 7, 8), caller_snapshot)
    assert report.kept == {}
    assert report.how["0.bn"] == "merged"
    assert norms(folded) == []
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2
    host = "0.scale.0" if start_with_scale else "0.kxk.0.0"
    assert report.folded["0.bn"] == [host]
    assert isinstance(folded.get_submodule(host), nn.Conv2d)
    assert folded.get_submodule(host).kernel_size == (3, 3)


def test_timm_same_padding_conv_takes_the_batchnorm_after_it_not_before(
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    """timm's Conv2dSame pads with zeros at run time, then convolves: exact after, not before."""
    same = pytest.importorskip("real_models").import_timm().layers.Conv2dSame
    torch.manual_seed(SEED)
    after = ConvThen(nn.BatchNorm2d(6))
    after.conv = same(3, 6, 3, stride=2)
    folded, report = check_folds_exactly(after, torch.randn(2, 3, 9, 8), caller_snapshot)
    assert report.folded == {"bn": ["conv"]} and norms(folded) == []
    check_kept(
        BNThen(nn.BatchNorm2d(4), same(4, 6, 3)),
        torch.randn(IMAGE),
        caller_snapshot,
        ["'after', whose class Conv2dSame overrides forward()"],
    )


class MixedConv(nn.Module):
    """MixNet's MixedConv2d: channel groups convolved with different kernels, concatenated."""

    def __init__(self, read_part_twice: bool = False) -> None:
        super().__init__()
        self.read_part_twice = read_part_twice
        self.c3 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.c5 = nn.Conv2d(2, 3, 5, padding=2)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [2, 2], dim=1)
        part = self.c5(b)
        y = self.bn(torch.cat([self.c3(a), part], 1))
        return y + part.sum(1, keepdim=True) if self.read_part_twice else y


def test_batchnorm_of_a_concatenation_of_convs_folds_a_slice_into_each(
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    folded, report = check_folds_exactly(MixedConv(), torch.randn(IMAGE), caller_snapshot)
    assert report.folded == {"bn": ["c3", "c5"]} and report.how == {"bn": "after"}
    assert norms(folded) == []


def test_concatenation_with_a_part_read_elsewhere_is_kept(
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    check_kept(
        MixedConv(read_part_twice=True),
        torch.randn(IMAGE),
        caller_snapshot,
        ["part from 'c5' is also read or changed elsewhere ('cat', 'sum')"],
    )


class ReturnsLayerOutputToo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return self.bn(y), y


class ReturnsNormOutputToo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.after = nn.Conv2d(4, 6, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.bn(x)
        return self.after(y), y


@pytest.mark.parametrize(
    ("model_class", "reason"),
    [
        pytest.param(ReturnsLayerOutputToo, "'batch_norm', \"the model's output\"", id="layer"),
        pytest.param(ReturnsNormOutputToo, "'conv2d', \"the model's output\"", id="norm"),
    ],
)
def test_a_tensor_the_model_returns_is_read(
    model_class: type[nn.Module],
    reason: str,
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    """Returning a tensor reads it with no operation inside the model; folding would change it."""
    torch.manual_seed(SEED)
    model = randomize(model_class()).train()
    assert_unchanged = caller_snapshot(model)
    x = torch.randn(IMAGE)
    folded, report = fold_batchnorm_with_report(model, x)
    assert_unchanged()
    assert list(report.kept) == ["bn"] and reason in report.kept["bn"], report.kept
    with torch.no_grad():
        for got, want in zip(folded(x), copy.deepcopy(model).eval()(x), strict=True):
            assert torch.equal(got, want)


def test_the_fold_imports_neither_timm_nor_torchvision() -> None:
    """Known classes are matched by name: folding a plain torch model loads neither library."""
    code = (
        "import sys, torch; from export import fold_batchnorm; "
        "fold_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), "
        "torch.randn(2, 3, 8, 8)); "
        "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
