"""Sequences of varying length: where LayerNorm wins and per-step BatchNorm is tricky, measured.

Demonstrations 10-12 of the behaviour report, on the two recurrent models of
models/sequence.py trained the same way (``digits_sequence``'s recipe: one length per batch
from 4..12 rows): accuracy versus the number of rows, inside and past the trained lengths,
with each of BatchNorm's fallbacks past them; what padding does to BatchNorm's per-step
batch statistics and to its running statistics; and one sequence's answer alone versus in
batches of mixed lengths. Like export/behavior.py, every function works on copies (the
caller's models never change) and returns a JSON-able dict of measured numbers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from export.behavior import _accuracy, _max_abs
from models.sequence import BEYOND_POLICIES, BatchNormSequenceLSTM, SequenceLSTM
from models.sequence_data import (
    EVAL_LENGTHS,
    TRAIN_LENGTHS,
    as_sequences,
    mixed_length_batch,
    pad_sequences,
    random_lengths,
    resample_rows,
)

LAYERNORM, BATCHNORM = "LayerNorm", "BatchNorm"
# Past the trained lengths, the "batch" fallback also runs one sequence at a time at these.
ALONE_LENGTHS = (16, 24)
PADDED_BATCH = 64
DRIFT_PASSES = 10
COMPANION_BATCHES = 32
COMPANION_SIZE = 8
PROBE_LENGTH = 8


@torch.no_grad()
def _run(model: nn.Module, rows: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    return model(rows) if lengths is None else model(rows, lengths)


def _bn_copy(model: BatchNormSequenceLSTM, *, train: bool, masked: bool = True) -> nn.Module:
    net = copy.deepcopy(model).train(train)
    net.masked_statistics = masked
    return net


# ---------------------------------------------------------------------------- 10


def demo_length_accuracy(
    layernorm: SequenceLSTM,
    batchnorm: BatchNormSequenceLSTM,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    lengths: Sequence[int] = EVAL_LENGTHS,
    alone_lengths: Sequence[int] = ALONE_LENGTHS,
) -> dict[str, Any]:
    """Eval-mode accuracy at each length (every digit resampled to it, the whole set as one
    batch), for LayerNorm and for BatchNorm under each fallback past its trained steps; the
    "batch" fallback also one sequence at a time at ``alone_lengths``."""
    ln = copy.deepcopy(layernorm).eval()
    result: dict[str, Any] = {
        "lengths": list(lengths),
        "train_lengths": list(TRAIN_LENGTHS),
        "batchnorm_steps": batchnorm.max_steps,
        "samples": len(images),
        LAYERNORM: [_accuracy(_run(ln, resample_rows(images, n)), labels) for n in lengths],
    }
    policies: dict[str, list[float]] = {}
    for policy in BEYOND_POLICIES:
        bn = copy.deepcopy(batchnorm).eval().set_beyond(policy)
        policies[policy] = [_accuracy(_run(bn, resample_rows(images, n)), labels) for n in lengths]
    result[BATCHNORM] = policies
    bn = copy.deepcopy(batchnorm).eval().set_beyond("batch")
    alone = []
    for n in alone_lengths:
        rows = resample_rows(images, n)
        alone.append(_accuracy(torch.cat([_run(bn, r[None]) for r in rows]), labels))
    result["batch_alone"] = {"lengths": list(alone_lengths), "accuracy": alone}
    result["summary"] = _length_summary(result)
    return result


def _length_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Mean accuracy over the lengths inside, below and above the trained range."""
    low, high = result["train_lengths"]
    groups = {
        "inside": [n for n in result["lengths"] if low <= n <= high],
        "below": [n for n in result["lengths"] if n < low],
        "above": [n for n in result["lengths"] if n > high],
    }
    curves = {LAYERNORM: result[LAYERNORM]}
    curves |= {f"{BATCHNORM} {p}": v for p, v in result[BATCHNORM].items()}
    summary: dict[str, Any] = {"lengths": groups}
    for name, accuracy in curves.items():
        at = dict(zip(result["lengths"], accuracy, strict=True))
        summary[name] = {g: float(np.mean([at[n] for n in ns])) for g, ns in groups.items() if ns}
        summary[name]["longest"] = accuracy[-1]
    return summary


# ---------------------------------------------------------------------------- 11


def demo_padding(
    layernorm: SequenceLSTM,
    batchnorm: BatchNormSequenceLSTM,
    images: torch.Tensor,
    labels: torch.Tensor,
    validation: torch.Tensor,
    *,
    batch_size: int = PADDED_BATCH,
    passes: int = DRIFT_PASSES,
    seed: int = 0,
) -> dict[str, Any]:
    """A batch of ``batch_size`` test digits at random training lengths, zero-padded.

    Per step: how many rows are real, and how far BatchNorm's batch statistics of the input
    contribution move when the padded rows count (its mean shift in standard deviations and
    its variance ratio). Train-mode outputs with padded rows in the statistics versus left
    out, and LayerNorm's padded-batch outputs versus each sequence alone. Then ``passes``
    train-mode passes (no gradient, no optimizer) over padded validation batches, and the
    eval accuracy at each training length afterwards: padding counted, padding masked, and
    equal-length batches (as in training) for control.
    """
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(images), generator=generator)[:batch_size]
    padded, lengths = mixed_length_batch(images[pick], generator)
    steps = _step_statistics(batchnorm, padded, lengths)
    outputs = {
        masked: _run(_bn_copy(batchnorm, train=True, masked=masked), padded, lengths)
        for masked in (True, False)
    }
    ln = copy.deepcopy(layernorm)
    sequences = [row[: int(n)] for row, n in zip(padded, lengths, strict=True)]
    ln_alone = {
        mode: torch.cat([_run(ln.train(mode == "train"), s[None]) for s in sequences])
        for mode in ("train", "eval")
    }
    ln_batched = {mode: _run(ln.train(mode == "train"), padded, lengths) for mode in ln_alone}
    truth = labels[pick]
    return {
        "batch_size": batch_size,
        "lengths": lengths.tolist(),
        "steps": steps,
        "batchnorm_train": {
            "accuracy_padding_masked": _accuracy(outputs[True], truth),
            "accuracy_padding_counted": _accuracy(outputs[False], truth),
            "max_abs_logit_difference": _max_abs(outputs[True], outputs[False]),
            "predictions_changed": float(
                (outputs[True].argmax(1) != outputs[False].argmax(1)).float().mean()
            ),
        },
        "layernorm_padded_vs_alone": {
            mode: _max_abs(ln_batched[mode], ln_alone[mode]) for mode in ln_alone
        },
        "drift": _padding_drift(batchnorm, validation, images, labels, passes, seed),
    }


@torch.no_grad()
def _step_statistics(
    model: BatchNormSequenceLSTM, padded: torch.Tensor, lengths: torch.Tensor
) -> dict[str, list[float]]:
    """Per step: real rows, and the input contribution's batch mean shift (in standard
    deviations of the real rows) and variance ratio with the padded rows counted."""
    table: dict[str, list[float]] = {"real_rows": [], "mean_shift_std": [], "variance_ratio": []}
    eps = model.cell.norm_input.eps
    for t in range(padded.shape[1]):
        z = model.cell.input_to_gates(padded[:, t])
        real = z[lengths > t]
        mean, var = real.mean(0), real.var(0, correction=0)
        table["real_rows"].append(len(real))
        shift = (z.mean(0) - mean).abs() / (var + eps).sqrt()
        table["mean_shift_std"].append(float(shift.mean()))
        table["variance_ratio"].append(float(((z.var(0, correction=0) + eps) / (var + eps)).mean()))
    return table


def _padding_drift(
    model: BatchNormSequenceLSTM,
    validation: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    passes: int,
    seed: int,
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    chunks = validation.split(PADDED_BATCH)
    low, high = TRAIN_LENGTHS
    lengths = list(range(low, high + 1))
    scenarios: dict[str, nn.Module] = {
        "untouched": copy.deepcopy(model),
        "equal_lengths": copy.deepcopy(model),
        "padding_masked": _bn_copy(model, train=False, masked=True),
        "padding_counted": _bn_copy(model, train=False, masked=False),
    }
    for i in range(passes):
        chunk = chunks[i % len(chunks)]
        padded, chunk_lengths = mixed_length_batch(chunk, generator)
        equal = resample_rows(chunk, int(random_lengths(1, generator)[0]))
        _run(scenarios["equal_lengths"].train(), equal)
        for name in ("padding_masked", "padding_counted"):
            _run(scenarios[name].train(), padded, chunk_lengths)
    result: dict[str, Any] = {"passes": passes, "lengths": lengths, "running_mean_change": {}}
    for name, net in scenarios.items():
        net.eval()
        result[name] = [_accuracy(_run(net, resample_rows(images, n)), labels) for n in lengths]
        result["running_mean_change"][name] = _running_mean_change(model, net)
    return result


def _running_mean_change(before: nn.Module, after: nn.Module) -> list[float]:
    """Per step, the largest change of any per-step running mean."""
    old = {k: v for k, v in before.state_dict().items() if k.endswith("running_mean")}
    new = after.state_dict()
    table = torch.stack([(new[k] - v).abs().amax(1) for k, v in old.items()])
    return table.amax(0).tolist()


# ---------------------------------------------------------------------------- 12


def demo_alone_vs_mixed(
    layernorm: SequenceLSTM,
    batchnorm: BatchNormSequenceLSTM,
    images: torch.Tensor,
    *,
    probe_length: int = PROBE_LENGTH,
    batch_size: int = COMPANION_SIZE,
    companions: int = COMPANION_BATCHES,
    seed: int = 0,
) -> dict[str, Any]:
    """Test digit 0 at ``probe_length`` rows, alone and first in ``companions`` padded batches
    of ``batch_size`` with random other digits at random training lengths (lengths passed).

    Each model and mode is compared with the same model and mode alone, except BatchNorm in
    train mode: alone it is a batch of one, whose variance is 0 (the answer is then the same
    for every input: ``batchnorm_train_alone_any_input``), so it is compared with eval mode
    alone, the answer a server gives."""
    generator = torch.Generator().manual_seed(seed)
    probe = resample_rows(images[:1], probe_length)[0]
    batches = []
    for _ in range(companions):
        others = torch.randperm(len(images) - 1, generator=generator)[: batch_size - 1] + 1
        rest = as_sequences(images[others], random_lengths(batch_size - 1, generator))
        batches.append(pad_sequences([probe, *rest]))
    variants = {
        f"{LAYERNORM} eval": (copy.deepcopy(layernorm).eval(), None),
        f"{LAYERNORM} train": (copy.deepcopy(layernorm).train(), None),
        f"{BATCHNORM} eval": (_bn_copy(batchnorm, train=False), None),
        f"{BATCHNORM} train, padding masked": (_bn_copy(batchnorm, train=True), "eval"),
        f"{BATCHNORM} train, padding counted": (
            _bn_copy(batchnorm, train=True, masked=False),
            "eval",
        ),
    }
    bn_eval = _bn_copy(batchnorm, train=False)
    result: dict[str, Any] = {
        "probe_length": probe_length,
        "batch_size": batch_size,
        "companion_batches": companions,
    }
    for name, (net, reference) in variants.items():
        alone = _run(bn_eval if reference else net, probe[None])[0]
        inside = torch.stack([_run(net, rows, lengths)[0] for rows, lengths in batches])
        result[name] = {
            "compared_with": "eval mode alone" if reference else "itself alone",
            "max_abs_difference": _max_abs(inside, alone.expand_as(inside)),
            "prediction_changed": float((inside.argmax(1) != alone.argmax()).float().mean()),
        }
    two = resample_rows(images[:2], probe_length)
    lone = _bn_copy(batchnorm, train=True)
    result["batchnorm_train_alone_any_input"] = _max_abs(_run(lone, two[:1]), _run(lone, two[1:]))
    return result
