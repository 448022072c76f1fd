"""BatchNorm folding: the pure weight math, each foldable pattern, and every case that must stay.

Every model gets random BatchNorm statistics and affine parameters (the defaults are an identity
map that hides wrong formulas) and is left in train mode, so that a fold that touched the
caller's model, its mode or its running statistics is caught.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from export import FoldReport, fold_batchnorm, fold_batchnorm_with_report
from export.fold import fold_weights

# Folded float32 model vs model.eval(): max|Δ| <= RTOL * max(1, max|reference|). Folding moves
# the BatchNorm into the weights, which reorders float32 rounding: a few ulps of the output.
RTOL = 1e-5
# fold_weights in float64 vs the float64 hand computation: only the order of a few float64
# operations differs.
FLOAT64_RTOL = 1e-12
# A half-precision fold vs the same model folded in float32: fp16 keeps ~3 decimal digits.
FP16_RTOL = 1e-2
# A broken fold (a BatchNorm lost or applied twice) moves outputs by O(1); a correct one by
# rounding. Comparisons that must show a difference require more than this.
CLEARLY_DIFFERENT = 1e-2

SEED = 0


def bound(reference: torch.Tensor, rtol: float = RTOL) -> float:
    return rtol * max(1.0, float(reference.detach().abs().max()))


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max())


def eval_reference(model: nn.Module, *args: Any) -> torch.Tensor:
    """What ``model.eval()`` computes, without touching the caller's model."""
    with torch.no_grad():
        return copy.deepcopy(model).eval()(*args)


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def assert_all_eval(model: nn.Module) -> None:
    assert not any(m.training for m in model.modules())


# ---------------------------------------------------------------------------- fold_weights

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
IN_CHANNELS, OUT_CHANNELS = 4, 6


def hand_eval_batchnorm(
    y: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> torch.Tensor:
    shape = (1, -1, *([1] * (y.dim() - 2)))
    out = (y - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)
    if gamma is not None:
        out = out * gamma.reshape(shape)
    if beta is not None:
        out = out + beta.reshape(shape)
    return out


def hand_folded_weight(
    weight: torch.Tensor, scale: torch.Tensor, transposed: bool, groups: int
) -> torch.Tensor:
    """Scales each weight entry by its output channel's factor, one entry at a time."""
    expected = weight.clone()
    if not transposed:
        for out_channel in range(weight.shape[0]):
            expected[out_channel] = weight[out_channel] * scale[out_channel]
        return expected
    in_per_group = weight.shape[0] // groups
    out_per_group = weight.shape[1]
    for in_channel in range(weight.shape[0]):
        group = in_channel // in_per_group
        for j in range(out_per_group):
            out_channel = group * out_per_group + j
            expected[in_channel, j] = weight[in_channel, j] * scale[out_channel]
    return expected


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_fold_weights_matches_float64_batchnorm_of_conv(
    dims: int, transposed: bool, groups: int, affine: bool, with_bias: bool
) -> None:
    g = torch.Generator().manual_seed(SEED)
    kernel = (3,) * dims
    if transposed:
        weight_shape = (IN_CHANNELS, OUT_CHANNELS // groups, *kernel)
    else:
        weight_shape = (OUT_CHANNELS, IN_CHANNELS // groups, *kernel)
    f64 = torch.float64
    weight = torch.randn(weight_shape, generator=g, dtype=f64)
    bias = torch.randn(OUT_CHANNELS, generator=g, dtype=f64) if with_bias else None
    mean = torch.empty(OUT_CHANNELS, dtype=f64).uniform_(-1, 1, generator=g)
    var = torch.empty(OUT_CHANNELS, dtype=f64).uniform_(0.1, 3, generator=g)
    gamma = torch.empty(OUT_CHANNELS, dtype=f64).uniform_(-2, 2, generator=g) if affine else None
    beta = torch.empty(OUT_CHANNELS, dtype=f64).uniform_(-1, 1, generator=g) if affine else None
    eps = 1e-3
    x = torch.randn(2, IN_CHANNELS, *([5] * dims), generator=g, dtype=f64)

    conv = (CONV_T if transposed else CONV)[dims]
    extra = {"stride": 2} if transposed else {}
    expected = hand_eval_batchnorm(
        conv(x, weight, bias, groups=groups, **extra), mean, var, eps, gamma, beta
    )
    new_weight, new_bias = fold_weights(
        weight, bias, mean, var, eps, gamma, beta, transposed=transposed, groups=groups
    )
    actual = conv(x, new_weight, new_bias, groups=groups, **extra)
    assert actual.shape[1] == OUT_CHANNELS
    assert max_error(actual, expected) <= bound(expected, FLOAT64_RTOL)

    # The weights themselves, entry by entry, and b' = (b - μ)·s + β.
    scale = 1 / torch.sqrt(var + eps) * (gamma if gamma is not None else 1)
    want_weight = hand_folded_weight(weight, scale, transposed, groups)
    assert max_error(new_weight, want_weight) <= bound(want_weight, FLOAT64_RTOL)
    want_bias = ((bias if bias is not None else 0) - mean) * scale
    want_bias = want_bias + (beta if beta is not None else 0)
    assert max_error(new_bias, want_bias) <= bound(want_bias, FLOAT64_RTOL)
    # Inputs are left alone.
    assert new_weight.data_ptr() != weight.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_fold_weights_returns_the_weight_dtype(dtype: torch.dtype) -> None:
    weight = torch.randn(6, 4, 3, 3).to(dtype)
    mean, var = torch.zeros(6), torch.full((6,), 0.25)
    new_weight, new_bias = fold_weights(weight, None, mean, var, 0.0, None, None)
    assert new_weight.dtype == dtype and new_bias.dtype == dtype
    # var 0.25, eps 0: every weight doubles exactly.
    assert torch.equal(new_weight, weight * 2)
    assert torch.equal(new_bias, torch.zeros(6, dtype=dtype))


# ---------------------------------------------------------------------------- foldable patterns


class LayerThenBN(nn.Module):
    def __init__(self, layer: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.layer(x))


BN_FOR_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def pattern(
    make_layer: Callable[[], nn.Module],
    shape: tuple[int, ...],
    out_channels: int,
    id: str,
    **bn_kwargs: Any,
) -> Any:
    return pytest.param(make_layer, shape, out_channels, bn_kwargs, id=id)


PATTERNS = [
    pattern(lambda: nn.Conv1d(4, 6, 3), (5, 4, 11), 6, "conv1d"),
    pattern(lambda: nn.Conv1d(4, 6, 3, bias=False), (5, 4, 11), 6, "conv1d-no-bias"),
    pattern(lambda: nn.Conv2d(4, 6, 3, padding=1), (5, 4, 7, 9), 6, "conv2d"),
    pattern(lambda: nn.Conv2d(4, 6, 3, stride=2, bias=False), (5, 4, 9, 9), 6, "conv2d-no-bias"),
    pattern(lambda: nn.Conv3d(4, 6, 3), (3, 4, 5, 6, 7), 6, "conv3d"),
    pattern(lambda: nn.Conv3d(4, 6, 3, bias=False), (3, 4, 5, 6, 7), 6, "conv3d-no-bias"),
    pattern(lambda: nn.Conv1d(4, 6, 3, groups=2), (5, 4, 11), 6, "conv1d-groups2"),
    pattern(lambda: nn.Conv2d(4, 6, 3, groups=2), (5, 4, 7, 9), 6, "conv2d-groups2"),
    pattern(lambda: nn.Conv3d(4, 6, 3, groups=2, bias=False), (3, 4, 5, 6, 7), 6, "conv3d-g2"),
    pattern(lambda: nn.Conv2d(6, 6, 3, groups=6, padding=1), (5, 6, 7, 9), 6, "depthwise2d"),
    pattern(lambda: nn.Conv1d(6, 6, 5, groups=6, bias=False), (5, 6, 11), 6, "depthwise1d"),
    pattern(lambda: nn.Conv2d(4, 8, 3, groups=4), (5, 4, 7, 9), 8, "depthwise-multiplier2"),
    pattern(lambda: nn.ConvTranspose1d(4, 6, 3), (5, 4, 11), 6, "convT1d"),
    pattern(lambda: nn.ConvTranspose1d(4, 6, 3, bias=False), (5, 4, 11), 6, "convT1d-no-bias"),
    pattern(lambda: nn.ConvTranspose2d(4, 6, 3, stride=2), (5, 4, 7, 9), 6, "convT2d"),
    pattern(lambda: nn.ConvTranspose2d(4, 6, 3, bias=False), (5, 4, 7, 9), 6, "convT2d-no-bias"),
    pattern(lambda: nn.ConvTranspose3d(4, 6, 3), (3, 4, 5, 6, 7), 6, "convT3d"),
    pattern(lambda: nn.ConvTranspose3d(4, 6, 3, bias=False), (3, 4, 5, 6, 7), 6, "convT3d-nb"),
    pattern(lambda: nn.ConvTranspose1d(4, 6, 3, groups=2), (5, 4, 11), 6, "convT1d-groups2"),
    pattern(
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (5, 4, 7, 9), 6, "convT2d-groups2"
    ),
    pattern(
        lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False),
        (5, 4, 7, 9),
        6,
        "convT2d-groups2-no-bias",
    ),
    pattern(lambda: nn.ConvTranspose3d(4, 6, 3, groups=2), (3, 4, 5, 6, 7), 6, "convT3d-groups2"),
    pattern(lambda: nn.ConvTranspose2d(6, 6, 3, groups=6), (5, 6, 7, 9), 6, "convT2d-depthwise"),
    pattern(lambda: nn.Linear(4, 6), (8, 4), 6, "linear"),
    pattern(lambda: nn.Linear(4, 6, bias=False), (8, 4), 6, "linear-no-bias"),
    pattern(lambda: nn.Conv2d(4, 6, 3), (5, 4, 7, 9), 6, "affine-false", affine=False),
    pattern(lambda: nn.Linear(4, 6), (8, 4), 6, "linear-affine-false", affine=False),
    pattern(lambda: nn.Conv2d(4, 6, 3), (5, 4, 7, 9), 6, "eps1e-3", eps=1e-3),
    pattern(lambda: nn.Conv2d(4, 6, 3), (5, 4, 7, 9), 6, "eps1e-1", eps=1e-1),
    pattern(lambda: nn.Linear(4, 6), (8, 4), 6, "linear-eps1e-1", eps=1e-1),
    pattern(lambda: nn.Conv2d(4, 6, 3), (5, 4, 7, 9), 6, "momentum-none", momentum=None),
    pattern(lambda: nn.Conv2d(4, 6, 3), (5, 4, 7, 9), 6, "momentum0.3", momentum=0.3),
    pattern(lambda: nn.Conv1d(4, 6, 3), (5, 4, 11), 6, "conv1d-momentum-none", momentum=None),
]


@pytest.mark.parametrize(("make_layer", "shape", "out_channels", "bn_kwargs"), PATTERNS)
def test_foldable_pattern_is_folded_exactly_and_caller_untouched(
    make_layer: Callable[[], nn.Module],
    shape: tuple[int, ...],
    out_channels: int,
    bn_kwargs: dict[str, Any],
    randomize_bn: Callable[..., nn.Module],
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    layer = make_layer()
    x = torch.randn(shape)
    with torch.no_grad():
        out_rank = layer(x).dim()
    model = randomize_bn(LayerThenBN(layer, BN_FOR_RANK[out_rank](out_channels, **bn_kwargs)))
    model.train()
    assert_unchanged = caller_snapshot(model)

    folded, report = fold_batchnorm_with_report(model, x)

    assert_unchanged()
    assert model.training and model.bn.training
    assert folded is not model
    assert not folded.training and not folded.layer.training
    assert batchnorms(folded) == []
    assert report.folded == {"bn": ["layer"]}
    assert report.kept == {}
    assert report.summary() == "BN folded 1/1"
    assert folded.layer.weight.dtype == torch.float32
    assert folded.layer.bias is not None
    expected = eval_reference(model, x)
    with torch.no_grad():
        actual = folded(x)
    assert actual.shape == expected.shape
    assert max_error(actual, expected) <= bound(expected)
    # Another batch size, which the fold never saw.
    x2 = torch.randn(2, *shape[1:])
    with torch.no_grad():
        assert max_error(folded(x2), eval_reference(model, x2)) <= bound(eval_reference(model, x2))
    assert_unchanged()


def test_fold_batchnorm_returns_the_module_of_the_report(
    randomize_bn: Callable[..., nn.Module],
) -> None:
    torch.manual_seed(SEED)
    model = randomize_bn(LayerThenBN(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5))).train()
    x = torch.randn(2, 3, 8, 8)
    folded = fold_batchnorm(model, x)
    assert batchnorms(folded) == []
    assert batchnorms(model) == [model.bn]
    expected = eval_reference(model, x)
    with torch.no_grad():
        assert max_error(folded(x), expected) <= bound(expected)


def test_folded_module_is_entirely_in_eval_mode(randomize_bn: Callable[..., nn.Module]) -> None:
    """fold_batchnorm promises a new eval-mode module: every submodule, BN replacements too."""
    torch.manual_seed(SEED)
    model = randomize_bn(LayerThenBN(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5))).train()
    folded = fold_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert batchnorms(folded) == []
    assert [name for name, m in folded.named_modules() if m.training] == []


class SharedBN(nn.Module):
    """One BatchNorm module after two different convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c1(x)) + self.bn(self.c2(x))


class SameConvAndBNTwice(nn.Module):
    """conv→bn called twice on two inputs: the fold must happen once, not once per call."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x)) * self.bn(self.c(x.flip(-1)))


class MetadataReadsOnly(nn.Module):
    """The conv output's shape is read besides the BatchNorm: shape is not a value read."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        return self.bn(y).reshape(y.shape[0], y.size(1), -1)


@pytest.mark.parametrize(
    ("model_class", "layers"),
    [
        pytest.param(SharedBN, ["c1", "c2"], id="shared-bn-two-convs"),
        pytest.param(SameConvAndBNTwice, ["c"], id="same-conv-bn-twice"),
        pytest.param(MetadataReadsOnly, ["c"], id="shape-read-besides-bn"),
    ],
)
def test_multi_call_patterns_fold_correctly(
    model_class: type[nn.Module],
    layers: list[str],
    randomize_bn: Callable[..., nn.Module],
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    model = randomize_bn(model_class()).train()
    assert_unchanged = caller_snapshot(model)
    x = torch.randn(3, 4, 8, 8)

    folded, report = fold_batchnorm_with_report(model, x)

    assert_unchanged()
    assert sorted(report.folded.get("bn", [])) == layers
    assert report.kept == {}
    assert batchnorms(folded) == []
    expected = eval_reference(model, x)
    with torch.no_grad():
        actual = folded(x)
    assert max_error(actual, expected) <= bound(expected)


# ---------------------------------------------------------------------------- must not fold


class NoRunningStats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x))


class ReluBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.c(x)))


class OutputUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        return self.bn(y) + y


class ConvCalledTwiceOneBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x)) + self.c(x)


class WeightUsedByFunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x)) + F.conv2d(x, self.c.weight)


class WeightReadAsValue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x)) * self.c.weight.abs().mean()


class LinearRank3(nn.Module):
    """BatchNorm1d on (N, L, F) normalizes axis 1 (L), not the linear's features (F).

    L == F == num_features, so every shape fits and only the data flow tells the difference.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x))


IMAGE = (3, 4, 8, 8)
KEPT_CASES = [
    pytest.param(NoRunningStats, IMAGE, "track_running_stats", id="no-running-stats"),
    pytest.param(ReluBetween, IMAGE, "relu", id="relu-between"),
    pytest.param(OutputUsedTwice, IMAGE, "shares the output", id="output-used-twice"),
    pytest.param(ConvCalledTwiceOneBN, IMAGE, "of its 2 calls", id="conv-called-twice"),
    pytest.param(WeightUsedByFunctionalConv, IMAGE, "outside", id="weight-in-F.conv2d"),
    pytest.param(WeightReadAsValue, IMAGE, "outside", id="weight-read-as-value"),
    pytest.param(LinearRank3, (5, 6, 4), "rank-3", id="linear-rank3"),
]


@pytest.mark.parametrize(("model_class", "shape", "reason_part"), KEPT_CASES)
def test_unsafe_batchnorm_is_kept_with_a_reason_and_output_exact(
    model_class: type[nn.Module],
    shape: tuple[int, ...],
    reason_part: str,
    randomize_bn: Callable[..., nn.Module],
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    model = randomize_bn(model_class()).train()
    assert_unchanged = caller_snapshot(model)
    x = torch.randn(shape)

    folded, report = fold_batchnorm_with_report(model, x)

    assert_unchanged()
    assert report.folded == {}
    assert list(report.kept) == ["bn"]
    assert reason_part in report.kept["bn"]
    assert report.summary() == "BN folded 0/1"
    kept = batchnorms(folded)
    assert len(kept) == 1 and not kept[0].training
    # Nothing was rewritten: the weights and the output are the eval model's, bit for bit.
    for name, param in model.named_parameters():
        assert torch.equal(folded.get_parameter(name), param), name
    expected = eval_reference(model, x)
    with torch.no_grad():
        actual = folded(x)
    assert torch.equal(actual, expected)


class ReadsBatchNormBuffer(nn.Module):
    """Reads the BatchNorm's running variance outside its call (e.g. for a scale estimate)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x)) * self.bn.running_var.reshape(1, -1, 1, 1)


class ReadsBatchNormAttribute(nn.Module):
    """Reads a plain attribute of the BatchNorm (its channel count) in forward()."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.c(x))
        return y.reshape(y.shape[0], self.bn.num_features, -1).mean(-1)


@pytest.mark.parametrize(
    "model_class",
    [
        pytest.param(ReadsBatchNormBuffer, id="bn-buffer-read"),
        pytest.param(ReadsBatchNormAttribute, id="bn-attribute-read"),
    ],
)
def test_model_reading_the_batchnorm_outside_its_call_still_runs(
    model_class: type[nn.Module],
    randomize_bn: Callable[..., nn.Module],
) -> None:
    """Folding or keeping are both fine, but the folded model must still compute the same."""
    torch.manual_seed(SEED)
    model = randomize_bn(model_class()).train()
    x = torch.randn(IMAGE)
    folded = fold_batchnorm(model, x)
    expected = eval_reference(model, x)
    with torch.no_grad():
        actual = folded(x)
    assert max_error(actual, expected) <= bound(expected)


def test_module_pattern_fuser_is_wrong_where_the_data_flow_fold_is_right(
    randomize_bn: Callable[..., nn.Module],
) -> None:
    """fuse_conv_bn_eval sees conv→bn modules, not that the conv output is also read raw."""
    torch.manual_seed(SEED)
    model = randomize_bn(OutputUsedTwice()).train()
    x = torch.randn(IMAGE)
    expected = eval_reference(model, x)

    naive = copy.deepcopy(model).eval()
    naive.c = fuse_conv_bn_eval(naive.c, naive.bn)
    naive.bn = nn.Identity()
    with torch.no_grad():
        naive_out = naive(x)
    assert max_error(naive_out, expected) > CLEARLY_DIFFERENT

    ours, report = fold_batchnorm_with_report(model, x)
    assert "bn" in report.kept
    with torch.no_grad():
        assert torch.equal(ours(x), expected)


# ---------------------------------------------------------------------------- precision


@pytest.mark.parametrize("eps", [1e-10, 1e-12])
@pytest.mark.parametrize(
    ("make_layer", "shape"),
    [
        pytest.param(lambda: nn.Conv2d(4, 6, 3), IMAGE, id="conv2d"),
        pytest.param(lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), IMAGE, id="convT2d-groups2"),
        pytest.param(lambda: nn.Linear(4, 6), (8, 4), id="linear"),
    ],
)
def test_tiny_running_variance_folds_within_relative_bound(
    make_layer: Callable[[], nn.Module],
    shape: tuple[int, ...],
    eps: float,
    randomize_bn: Callable[..., nn.Module],
) -> None:
    torch.manual_seed(SEED)
    x = torch.randn(shape)
    layer = make_layer()
    rank = len(shape)
    model = randomize_bn(LayerThenBN(layer, BN_FOR_RANK[rank](6, eps=eps))).train()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5e-8, 2e-8)
    folded, report = fold_batchnorm_with_report(model, x)
    assert report.folded == {"bn": ["layer"]}
    assert torch.isfinite(folded.layer.weight).all() and torch.isfinite(folded.layer.bias).all()
    expected = eval_reference(model, x)
    # The outputs are ~1e4: the bound must be relative to them to mean anything.
    assert float(expected.abs().max()) > 1e3
    with torch.no_grad():
        actual = folded(x)
    assert max_error(actual, expected) <= bound(expected)
    # And against float64 truth, the folded float32 model is as close as the unfolded one.
    truth = eval_reference(copy.deepcopy(model).double(), x.double())
    assert max_error(actual, truth) <= bound(truth)


@pytest.mark.parametrize("running_var", [None, 1e-6], ids=["random-var", "var1e-6"])
def test_half_precision_model_folds_to_finite_fp16_close_to_fp32_fold(
    running_var: float | None,
    randomize_bn: Callable[..., nn.Module],
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    model = randomize_bn(LayerThenBN(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)))
    if running_var is not None:
        with torch.no_grad():
            model.bn.running_var.fill_(running_var)
    model = model.half().train()
    assert_unchanged = caller_snapshot(model)
    x = torch.randn(IMAGE)

    folded16, report = fold_batchnorm_with_report(model, x.half())
    folded32 = fold_batchnorm(copy.deepcopy(model).float(), x)

    assert_unchanged()
    assert report.folded == {"bn": ["layer"]}
    w16, b16 = folded16.layer.weight, folded16.layer.bias
    assert w16.dtype == torch.float16 and b16.dtype == torch.float16
    assert torch.isfinite(w16).all() and torch.isfinite(b16).all()
    w32, b32 = folded32.layer.weight, folded32.layer.bias
    assert max_error(w16, w32) <= bound(w32, FP16_RTOL)
    assert max_error(b16, b32) <= bound(b32, FP16_RTOL)
    with torch.no_grad():
        out16 = folded16(x.half())
        out32 = folded32(x)
    assert out16.dtype == torch.float16
    assert max_error(out16, out32) <= bound(out32, FP16_RTOL)


# ---------------------------------------------------------------------------- inputs, no BN


def test_fold_without_example_input_guesses_one(
    randomize_bn: Callable[..., nn.Module],
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    model = randomize_bn(model).train()
    assert_unchanged = caller_snapshot(model)

    folded, report = fold_batchnorm_with_report(model)

    assert_unchanged()
    assert report.folded == {"1": ["0"]}
    assert batchnorms(folded) == []
    x = torch.randn(3, 3, 17, 19)
    expected = eval_reference(model, x)
    with torch.no_grad():
        assert max_error(folded(x), expected) <= bound(expected)


@pytest.mark.parametrize("with_example", [True, False], ids=["example", "no-example"])
def test_model_without_batchnorm_comes_back_as_an_eval_copy(
    with_example: bool, caller_snapshot: Callable[[nn.Module], Callable[[], None]]
) -> None:
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3)).train()
    assert_unchanged = caller_snapshot(model)
    x = torch.randn(16, 4)

    folded, report = fold_batchnorm_with_report(model, x if with_example else None)

    assert_unchanged()
    assert report == FoldReport()
    assert folded is not model
    assert_all_eval(folded)
    assert all(p is not q for p, q in zip(folded.parameters(), model.parameters(), strict=True))
    expected = eval_reference(model, x)
    with torch.no_grad():
        assert torch.equal(folded(x), expected)
