"""The reference BatchNorm/LayerNorm against torch's own modules.

Every module under test gets random weights, biases and running statistics: the defaults
(weight 1, bias 0, mean 0, variance 1) make many wrong formulas give right answers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from models.norms import (
    ReferenceBatchNorm,
    ReferenceLayerNorm,
    batch_norm_train_stats,
    layer_norm_stats,
)

# Largest absolute difference allowed between the reference and torch (float64; the real
# differences there are around 1e-15).
ATOL = 1e-6
# float32: the reference computes in float64 and rounds once, so what remains is torch's own
# float32 rounding, which grows with the output's magnitude (one ulp at |y| ~ 32 is 3.8e-6).
# Hence 1e-6 absolute plus 1e-6 relative to |y|: within 1e-6 for outputs of order 1.
FLOAT32_ATOL = 1e-6
FLOAT32_RTOL = 1e-6

DTYPES = [torch.float64, torch.float32]
NUM_FEATURES = 4

# (input shape, torch class) for each layout BatchNorm accepts.
BN_CASES = [
    pytest.param((8, NUM_FEATURES), nn.BatchNorm1d, id="1d-NC"),
    pytest.param((6, NUM_FEATURES, 5), nn.BatchNorm1d, id="1d-NCL"),
    pytest.param((4, NUM_FEATURES, 3, 5), nn.BatchNorm2d, id="2d"),
    pytest.param((3, NUM_FEATURES, 2, 3, 4), nn.BatchNorm3d, id="3d"),
]


def assert_close(actual: Tensor | None, expected: Tensor | None) -> None:
    assert actual is not None and expected is not None
    assert actual.dtype == expected.dtype
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=FLOAT32_ATOL, rtol=FLOAT32_RTOL)
    else:
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def random_input(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    # A per-channel offset and scale, so a wrong reduction axis cannot go unnoticed.
    x = torch.randn(shape, generator=gen, dtype=dtype)
    if len(shape) >= 2:
        view = (1, shape[1], *([1] * (len(shape) - 2)))
        offset = torch.randn(view, generator=gen, dtype=dtype)
        scale = torch.rand(view, generator=gen, dtype=dtype) + 0.5
        x = x * scale + offset
    return x


def randomize_bn(bn: nn.Module, gen: torch.Generator) -> None:
    """Random affine parameters, running stats and step count (where they exist)."""
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(bn.weight.shape, generator=gen) * 0.5 + 1.0)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen))
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
            bn.num_batches_tracked.fill_(int(torch.randint(1, 10, (1,), generator=gen)))


def make_bn_pair(
    torch_cls: type[nn.Module], dtype: torch.dtype, gen: torch.Generator, **kwargs: object
) -> tuple[nn.Module, ReferenceBatchNorm]:
    """A randomized torch BatchNorm and a reference one holding the same state."""
    theirs = torch_cls(NUM_FEATURES, **kwargs)
    randomize_bn(theirs, gen)
    theirs.to(dtype)
    ours = ReferenceBatchNorm(NUM_FEATURES, **kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def assert_same_bn_state(ours: ReferenceBatchNorm, theirs: nn.Module) -> None:
    if theirs.running_mean is None:
        assert ours.running_mean is None
        assert ours.running_var is None
        assert ours.num_batches_tracked is None
        return
    assert_close(ours.running_mean, theirs.running_mean)
    assert_close(ours.running_var, theirs.running_var)
    assert ours.num_batches_tracked is not None
    assert ours.num_batches_tracked.dtype == torch.long
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


# ---------------------------------------------------------------------------------------
# batch_norm_train_stats / layer_norm_stats
# ---------------------------------------------------------------------------------------


def test_batch_norm_train_stats_by_hand() -> None:
    # Channel 0 holds 1, 3 (mean 2, biased var 1, unbiased 2); channel 1 holds 0, 4
    # (mean 2, biased var 4, unbiased 8).
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    mean, biased, unbiased = batch_norm_train_stats(x)
    assert torch.equal(mean, torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert torch.equal(biased, torch.tensor([1.0, 4.0], dtype=torch.float64))
    assert torch.equal(unbiased, torch.tensor([2.0, 8.0], dtype=torch.float64))


@pytest.mark.parametrize(("shape", "torch_cls"), BN_CASES)
def test_batch_norm_train_stats_match_torch(
    shape: tuple[int, ...], torch_cls: type[nn.Module]
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = random_input(shape, torch.float64, gen)
    dims = [0, *range(2, x.dim())]
    mean, biased, unbiased = batch_norm_train_stats(x)
    assert_close(mean, x.mean(dim=dims))
    assert_close(biased, x.var(dim=dims, correction=0))
    assert_close(unbiased, x.var(dim=dims, correction=1))


@pytest.mark.parametrize("k", [1, 2])
def test_layer_norm_stats_match_torch(k: int) -> None:
    gen = torch.Generator().manual_seed(1)
    x = random_input((3, 4, 5, 6), torch.float64, gen)
    mean, var = layer_norm_stats(x, k)
    dims = list(range(x.dim() - k, x.dim()))
    assert_close(mean, x.mean(dim=dims, keepdim=True))
    assert_close(var, x.var(dim=dims, correction=0, keepdim=True))


# ---------------------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize(("shape", "torch_cls"), BN_CASES)
def test_batchnorm_train_steps_match_torch(
    shape: tuple[int, ...],
    torch_cls: type[nn.Module],
    momentum: float | None,
    dtype: torch.dtype,
) -> None:
    gen = torch.Generator().manual_seed(2)
    theirs, ours = make_bn_pair(torch_cls, dtype, gen, momentum=momentum)
    theirs.train()
    ours.train()
    for _ in range(4):
        x = random_input(shape, dtype, gen)
        assert_close(ours(x), theirs(x))
        assert_same_bn_state(ours, theirs)
    # And the statistics accumulated over those steps drive eval mode the same way.
    theirs.eval()
    ours.eval()
    x = random_input(shape, dtype, gen)
    assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "torch_cls"), BN_CASES)
def test_batchnorm_eval_matches_torch_and_leaves_state(
    shape: tuple[int, ...], torch_cls: type[nn.Module], dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(3)
    theirs, ours = make_bn_pair(torch_cls, dtype, gen)
    theirs.eval()
    ours.eval()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = random_input(shape, dtype, gen)
    out = ours(x)
    assert_close(out, theirs(x))
    # Eval mode reads the running statistics and never writes them.
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k
    # ...and really normalizes with them, not with the batch's own statistics.
    assert not torch.allclose(out, copy.deepcopy(ours).train()(x), atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1, 1.0])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_eps(eps: float, training: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    theirs, ours = make_bn_pair(nn.BatchNorm2d, dtype, gen, eps=eps)
    # Small batch and running variances, so that eps is not negligible against either.
    with torch.no_grad():
        for bn in (theirs, ours):
            bn.running_var.mul_(0.05**2)
    x = random_input((4, NUM_FEATURES, 3, 3), dtype, gen) * 0.05
    theirs.train(training)
    ours.train(training)
    other = copy.deepcopy(ours)
    out = ours(x)
    assert_close(out, theirs(x))
    assert_same_bn_state(ours, theirs)
    # eps actually reaches the formula: ten times the eps gives a different output.
    other.eps = eps * 10
    assert not torch.allclose(other(x), out, atol=1e-3, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("shape", "torch_cls"), BN_CASES)
def test_batchnorm_affine_false(
    shape: tuple[int, ...], torch_cls: type[nn.Module], training: bool, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(5)
    theirs, ours = make_bn_pair(torch_cls, dtype, gen, affine=False)
    assert ours.weight is None and ours.bias is None
    assert list(ours.parameters()) == []
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.train(training)
    ours.train(training)
    for _ in range(2):
        x = random_input(shape, dtype, gen)
        assert_close(ours(x), theirs(x))
        assert_same_bn_state(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "torch_cls"), BN_CASES)
def test_batchnorm_without_running_stats(
    shape: tuple[int, ...], torch_cls: type[nn.Module], dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(6)
    theirs, ours = make_bn_pair(torch_cls, dtype, gen, track_running_stats=False)
    assert ours.running_mean is None
    assert ours.running_var is None
    assert ours.num_batches_tracked is None
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight", "bias"}
    x = random_input(shape, dtype, gen)
    ours.train()
    theirs.train()
    train_out = ours(x)
    assert_close(train_out, theirs(x))
    ours.eval()
    theirs.eval()
    eval_out = ours(x)
    assert_close(eval_out, theirs(x))
    # With nothing tracked, eval mode also uses the batch statistics.
    assert torch.equal(eval_out, train_out)
    assert_same_bn_state(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "torch_cls"), BN_CASES)
def test_batchnorm_state_dict_round_trip(
    shape: tuple[int, ...], torch_cls: type[nn.Module], dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(7)
    # torch -> reference: the reference then behaves exactly like the torch module.
    theirs = torch_cls(NUM_FEATURES)
    randomize_bn(theirs, gen)
    theirs.to(dtype).eval()
    ours = ReferenceBatchNorm(NUM_FEATURES).to(dtype)
    ours.load_state_dict(theirs.state_dict())  # strict: every key on both sides
    ours.eval()
    x = random_input(shape, dtype, gen)
    assert_close(ours(x), theirs(x))

    # reference -> torch: train the reference (random start) a few steps, then load it.
    ours = ReferenceBatchNorm(NUM_FEATURES).to(dtype)
    randomize_bn(ours, gen)
    ours.train()
    for _ in range(3):
        ours(random_input(shape, dtype, gen))
    fresh = torch_cls(NUM_FEATURES).to(dtype)
    fresh.load_state_dict(ours.state_dict())
    assert_same_bn_state(ours, fresh)
    assert_close(fresh.weight, ours.weight)
    assert_close(fresh.bias, ours.bias)
    fresh.eval()
    ours.eval()
    x = random_input(shape, dtype, gen)
    assert_close(ours(x), fresh(x))


@pytest.mark.parametrize(
    ("shape", "torch_cls"),
    [
        pytest.param((1, NUM_FEATURES), nn.BatchNorm1d, id="1d-NC"),
        pytest.param((1, NUM_FEATURES, 1), nn.BatchNorm1d, id="1d-NCL"),
        pytest.param((1, NUM_FEATURES, 1, 1), nn.BatchNorm2d, id="2d"),
        pytest.param((1, NUM_FEATURES, 1, 1, 1), nn.BatchNorm3d, id="3d"),
    ],
)
def test_batchnorm_one_value_per_channel(
    shape: tuple[int, ...], torch_cls: type[nn.Module]
) -> None:
    gen = torch.Generator().manual_seed(8)
    theirs, ours = make_bn_pair(torch_cls, torch.float64, gen)
    x = random_input(shape, torch.float64, gen)
    before = {k: v.clone() for k, v in ours.state_dict().items()}

    theirs.train()
    ours.train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        theirs(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as info:
        ours(x)
    # The message names the input size and says why.
    assert str(x.size()) in str(info.value)
    assert "variance" in str(info.value)
    # A refused batch leaves no trace in the running statistics.
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k

    # Eval mode normalizes with the running statistics, so one sample is fine.
    theirs.eval()
    ours.eval()
    assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_batch_of_one_with_length_trains(dtype: torch.dtype) -> None:
    # N = 1 is fine in training when the spatial axes give more than one value per channel.
    gen = torch.Generator().manual_seed(9)
    theirs, ours = make_bn_pair(nn.BatchNorm1d, dtype, gen)
    x = random_input((1, NUM_FEATURES, 7), dtype, gen)
    assert_close(ours(x), theirs(x))
    assert_same_bn_state(ours, theirs)


@pytest.mark.parametrize("shape", [(NUM_FEATURES,), (2, NUM_FEATURES, 2, 2, 2, 2), (2, 3)])
def test_batchnorm_rejects_bad_shapes(shape: tuple[int, ...]) -> None:
    ours = ReferenceBatchNorm(NUM_FEATURES)
    with pytest.raises(ValueError, match="got"):
        ours(torch.randn(shape))


@pytest.mark.parametrize(("shape", "torch_cls"), BN_CASES)
def test_batchnorm_gradients_match_torch(
    shape: tuple[int, ...], torch_cls: type[nn.Module]
) -> None:
    gen = torch.Generator().manual_seed(10)
    theirs, ours = make_bn_pair(torch_cls, torch.float64, gen)
    x = random_input(shape, torch.float64, gen)
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
    x_ours = x.clone().requires_grad_(True)
    x_theirs = x.clone().requires_grad_(True)
    (ours(x_ours) * upstream).sum().backward()
    (theirs(x_theirs) * upstream).sum().backward()
    assert_close(x_ours.grad, x_theirs.grad)
    assert_close(ours.weight.grad, theirs.weight.grad)
    assert_close(ours.bias.grad, theirs.bias.grad)


# ---------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------

# (normalized_shape as given to the constructor, input shape)
LN_CASES = [
    pytest.param(6, (5, 6), id="int-2d-input"),
    pytest.param((6,), (3, 4, 6), id="1-dim"),
    pytest.param((4, 6), (3, 4, 6), id="2-dims"),
    pytest.param([4, 6], (2, 3, 4, 6), id="2-dims-list"),
]


def make_ln_pair(
    normalized_shape: int | tuple[int, ...] | list[int],
    dtype: torch.dtype,
    gen: torch.Generator,
    **kwargs: object,
) -> tuple[nn.LayerNorm, ReferenceLayerNorm]:
    theirs = nn.LayerNorm(normalized_shape, **kwargs)
    with torch.no_grad():
        if theirs.weight is not None:
            theirs.weight.copy_(torch.randn(theirs.weight.shape, generator=gen) * 0.5 + 1.0)
        if theirs.bias is not None:
            theirs.bias.copy_(torch.randn(theirs.bias.shape, generator=gen))
    theirs.to(dtype)
    ours = ReferenceLayerNorm(normalized_shape, **kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def ln_input(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    # Each sample gets its own offset and scale, so that pooling statistics across samples
    # (or across the wrong dims) would show.
    lead = (*shape[:1], *([1] * (len(shape) - 1)))
    x = torch.randn(shape, generator=gen, dtype=dtype)
    return x * (torch.rand(lead, generator=gen, dtype=dtype) + 0.5) + torch.randn(
        lead, generator=gen, dtype=dtype
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="affine"),
        pytest.param({"elementwise_affine": False}, id="no-affine"),
        pytest.param({"bias": False}, id="no-bias"),
    ],
)
@pytest.mark.parametrize(("normalized_shape", "shape"), LN_CASES)
def test_layernorm_matches_torch(
    normalized_shape: int | tuple[int, ...] | list[int],
    shape: tuple[int, ...],
    kwargs: dict[str, bool],
    eps: float,
    dtype: torch.dtype,
) -> None:
    gen = torch.Generator().manual_seed(11)
    theirs, ours = make_ln_pair(normalized_shape, dtype, gen, eps=eps, **kwargs)
    assert ours.normalized_shape == theirs.normalized_shape
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert (ours.weight is None) == (theirs.weight is None)
    assert (ours.bias is None) == (theirs.bias is None)
    x = ln_input(shape, dtype, gen) * (0.1 if eps > 1e-3 else 1.0)
    assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("normalized_shape", "shape"), LN_CASES)
def test_layernorm_same_in_train_and_eval(
    normalized_shape: int | tuple[int, ...] | list[int], shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(12)
    _, ours = make_ln_pair(normalized_shape, dtype, gen)
    x = ln_input(shape, dtype, gen)
    train_out = ours.train()(x)
    train_again = ours(x)
    eval_out = ours.eval()(x)
    assert torch.equal(train_out, eval_out)
    assert torch.equal(train_again, eval_out)  # and training left nothing behind


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("normalized_shape", "shape"), LN_CASES)
def test_layernorm_batch_independence(
    normalized_shape: int | tuple[int, ...] | list[int], shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(13)
    _, ours = make_ln_pair(normalized_shape, dtype, gen)
    x = ln_input(shape, dtype, gen)
    out = ours(x)
    # Alone in its batch, each sample gives bit-for-bit the same output...
    for i in range(shape[0]):
        assert torch.equal(ours(x[i : i + 1]), out[i : i + 1])
    # ...and so it does next to entirely different companions.
    others = ln_input(shape, dtype, gen) * 10.0
    others[0] = x[0]
    assert torch.equal(ours(others)[0], out[0])
    assert not torch.allclose(ours(others)[1:], out[1:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("normalized_shape", "shape"), LN_CASES)
def test_layernorm_state_dict_round_trip(
    normalized_shape: int | tuple[int, ...] | list[int], shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(14)
    # torch -> reference is what make_ln_pair does; check it, then go back the other way.
    theirs, ours = make_ln_pair(normalized_shape, dtype, gen)
    x = ln_input(shape, dtype, gen)
    assert_close(ours(x), theirs(x))
    with torch.no_grad():
        assert ours.weight is not None and ours.bias is not None
        ours.weight.copy_(torch.randn(ours.weight.shape, generator=gen, dtype=dtype))
        ours.bias.copy_(torch.randn(ours.bias.shape, generator=gen, dtype=dtype))
    fresh = nn.LayerNorm(normalized_shape).to(dtype)
    fresh.load_state_dict(ours.state_dict())
    assert torch.equal(fresh.weight, ours.weight)
    assert torch.equal(fresh.bias, ours.bias)
    assert_close(ours(x), fresh(x))


def test_layernorm_rejects_mismatched_trailing_dims() -> None:
    ours = ReferenceLayerNorm((4, 6))
    with pytest.raises(ValueError, match="trailing dims"):
        ours(torch.randn(3, 6, 4))
    with pytest.raises(ValueError, match="trailing dims"):
        ours(torch.randn(6))


@pytest.mark.parametrize(("normalized_shape", "shape"), LN_CASES)
def test_layernorm_gradients_match_torch(
    normalized_shape: int | tuple[int, ...] | list[int], shape: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(15)
    theirs, ours = make_ln_pair(normalized_shape, torch.float64, gen)
    x = ln_input(shape, torch.float64, gen)
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
    x_ours = x.clone().requires_grad_(True)
    x_theirs = x.clone().requires_grad_(True)
    (ours(x_ours) * upstream).sum().backward()
    (theirs(x_theirs) * upstream).sum().backward()
    assert_close(x_ours.grad, x_theirs.grad)
    assert_close(ours.weight.grad, theirs.weight.grad)
    assert_close(ours.bias.grad, theirs.bias.grad)
