"""Digits as row sequences of varying length, and the LayerNorm / per-step BatchNorm LSTMs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from export.checkpoint import load_into
from models import REGISTRY
from models.data import Digits, Split, load_digits_split
from models.sequence import BEYOND_POLICIES, BatchNormSequenceLSTM, SequenceLSTM, StepBatchNorm
from models.sequence_data import (
    MAX_TRAIN_LENGTH,
    TRAIN_LENGTHS,
    as_sequences,
    mixed_length_batch,
    pad_sequences,
    resample_rows,
)
from models.train import train

SPEC = REGISTRY["digits_sequence"]
# The hidden state of a masked sample is exactly frozen; the rest is one batch's rounding
# against another's (other batch size, other kernels).
ROUNDING = 1e-5


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_digits_split().test.images[:16]


def _bn_trained_statistics(model: BatchNormSequenceLSTM, steps: int, x: torch.Tensor) -> None:
    """Per-step running statistics from a few train-mode passes at every length up to ``steps``
    (the weights stay random: only the statistics matter to these tests)."""
    model.train()
    with torch.no_grad():
        for length in range(2, steps + 1):
            model(resample_rows(x, length))
    model.eval()


def test_resampling_keeps_the_image_at_its_own_length_and_its_end_rows(
    digits: torch.Tensor,
) -> None:
    assert torch.equal(resample_rows(digits, 8), digits)
    for length in (2, 5, 13, 24):
        rows = resample_rows(digits, length)
        assert rows.shape == (16, length, 8)
        assert torch.equal(rows[:, 0], digits[:, 0]) and torch.equal(rows[:, -1], digits[:, -1])
        assert float(rows.min()) >= 0.0 and float(rows.max()) <= 1.0
    # Halfway between rows 0 and 1 of the image: their mean (15 rows: step 0.5).
    assert torch.allclose(resample_rows(digits, 15)[:, 1], digits[:, :2].mean(1))
    with pytest.raises(ValueError, match="at least 2 rows"):
        resample_rows(digits, 1)


def test_padding_and_lengths_are_deterministic(digits: torch.Tensor) -> None:
    a = mixed_length_batch(digits, torch.Generator().manual_seed(3))
    b = mixed_length_batch(digits, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    padded, lengths = a
    assert lengths.dtype == torch.int64 and padded.shape == (16, int(lengths.max()), 8)
    assert int(lengths.min()) >= TRAIN_LENGTHS[0] and int(lengths.max()) <= TRAIN_LENGTHS[1]
    for row, length in zip(padded, lengths, strict=True):
        assert not row[int(length) :].any()  # zeros after the end
    sequences = as_sequences(digits[:2], torch.tensor([3, 9]))
    assert [tuple(s.shape) for s in sequences] == [(3, 8), (9, 8)]
    assert torch.equal(pad_sequences(sequences)[0][1], sequences[1])


@pytest.mark.parametrize("build", [SequenceLSTM, BatchNormSequenceLSTM])
def test_any_length_and_masked_padding(build: type, digits: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = build().eval()
    if isinstance(model, BatchNormSequenceLSTM):
        _bn_trained_statistics(model, MAX_TRAIN_LENGTH, digits)
    with torch.no_grad():
        for length in (1, 3, 8, 20):
            assert model(torch.rand(5, length, 8)).shape == (5, 10)
        sequences = as_sequences(digits[:6], torch.tensor([2, 4, 7, 9, 12, 5]))
        padded, lengths = pad_sequences(sequences)
        # Anything after the end: garbage instead of zeros changes nothing either.
        padded = padded + 5 * (torch.arange(padded.shape[1]) >= lengths[:, None])[..., None]
        batched = model(padded, lengths)
        alone = torch.cat([model(s[None]) for s in sequences])
        assert float((batched - alone).abs().max()) <= ROUNDING
        # Without lengths the padded steps are read: the answer changes.
        assert float((model(padded) - alone).abs().max()) > 100 * ROUNDING
        # Equal lengths: passing them is the same as not passing them.
        same = resample_rows(digits, 6)
        assert torch.equal(model(same), model(same, torch.full((16,), 6)))


def test_layernorm_model_is_the_same_in_train_mode_and_in_any_batch(digits: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = SequenceLSTM()
    padded, lengths = mixed_length_batch(digits, torch.Generator().manual_seed(1))
    with torch.no_grad():
        train_out = model.train()(padded, lengths)
        eval_out = model.eval()(padded, lengths)
        reversed_batch = model(padded.flip(0), lengths.flip(0)).flip(0)
    assert torch.equal(train_out, eval_out)
    assert float((reversed_batch - eval_out).abs().max()) <= ROUNDING


def test_step_batchnorm_keeps_statistics_per_step() -> None:
    norm = StepBatchNorm(3, steps=2, momentum=1.0)
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randn(8, 3, generator=generator) * s + s for s in (1.0, 4.0))
    norm(first, 0)
    norm(second, 1)
    norm(torch.randn(8, 3, generator=generator) * 9, 2)  # past the last step: no statistics
    assert norm.steps_tracked.tolist() == [1, 1]
    assert torch.allclose(norm.running_mean[0], first.mean(0))
    assert torch.allclose(norm.running_var[1], second.var(0))  # unbiased, as torch stores it
    # Masked statistics: the rows left out do not count.
    keep = torch.tensor([True] * 4 + [False] * 4)
    norm(torch.cat([first[:4], torch.full((4, 3), 100.0)]), 0, keep)
    assert torch.allclose(norm.running_mean[0], first[:4].mean(0))
    norm.eval()
    x = torch.randn(4, 3, generator=generator)
    gamma = norm.weight
    last = (x - norm.running_mean[1]) / (norm.running_var[1] + norm.eps).sqrt() * gamma + norm.bias
    assert torch.allclose(norm(x, 1), last) and torch.allclose(norm(x, 5), last)  # "last"
    norm.beyond = "pooled"
    mean, var = norm.pooled()
    assert torch.allclose(mean, norm.running_mean.mean(0))
    # Law of total variance: mixing two steps' data has at least each one's variance.
    assert bool((var >= norm.running_var.min(0).values).all())
    assert not torch.allclose(norm(x, 5), last)
    norm.beyond = "batch"
    assert torch.allclose(
        norm(x, 5), (x - x.mean(0)) / (x.var(0, correction=0) + 1e-5).sqrt() * gamma + norm.bias
    )


def test_batchnorm_policies_differ_only_past_the_trained_steps(digits: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = BatchNormSequenceLSTM(max_steps=6)
    _bn_trained_statistics(model, 6, digits)
    inside, beyond = resample_rows(digits, 6), resample_rows(digits, 10)
    with torch.no_grad():
        outs = {p: (model.set_beyond(p)(inside), model(beyond)) for p in BEYOND_POLICIES}
        alone = model(beyond[:1])  # "batch" past step 6: batch-dependent
    assert all(torch.equal(outs["last"][0], o[0]) for o in outs.values())
    assert not torch.allclose(outs["last"][1], outs["pooled"][1])
    assert not torch.allclose(outs["batch"][1][:1], alone)
    with pytest.raises(ValueError, match="unknown policy"):
        model.set_beyond("nearest")  # type: ignore[arg-type]


def test_training_on_varying_lengths_is_deterministic() -> None:
    full = load_digits_split()
    # An eighth of the training digits: determinism does not need them all.
    data = Digits(
        Split(full.train.images[:128], full.train.labels[:128]), full.validation, full.test
    )
    first = train(SPEC, data, epochs=1, progress=None)
    second = train(SPEC, data, epochs=1, progress=None)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    torch.manual_seed(0)
    bn = train(SPEC, data, model=BatchNormSequenceLSTM(), epochs=1, progress=None).model
    # Every step up to the longest training length saw batches; none past it exists.
    for module in bn.modules():
        if isinstance(module, StepBatchNorm):
            assert module.steps == TRAIN_LENGTHS[1] and bool((module.steps_tracked > 0).all())


@pytest.mark.slow
def test_trained_model_reads_every_training_length(built_repository: tuple) -> None:
    _, checkpoints, _ = built_repository
    model = load_into(SequenceLSTM(), Path(checkpoints) / "digits_sequence.safetensors").eval()
    test = load_digits_split().test
    with torch.no_grad():
        for length in range(TRAIN_LENGTHS[0], TRAIN_LENGTHS[1] + 1):
            logits = model(resample_rows(test.images, length))
            accuracy = float((logits.argmax(1) == test.labels).float().mean())
            floor = SPEC.min_test_accuracy if length == 8 else 0.85
            assert accuracy >= floor, f"{length} rows: {accuracy:.2%}"
        padded, lengths = mixed_length_batch(test.images, torch.Generator().manual_seed(0))
        mixed = float((model(padded, lengths).argmax(1) == test.labels).float().mean())
    assert mixed >= 0.9
