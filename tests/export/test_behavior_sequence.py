"""Demonstrations 10-12 of the behaviour report (export/behavior_sequence.py) on small models.

Untrained LSTMs with 8 hidden units; the BatchNorm one gets per-step running statistics
from a few train-mode passes, so eval mode has real statistics to use. Seconds in all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from export import behavior_sequence as demos
from export.behavior_plots import write_plots
from export.behavior_sequence_report import SEQUENCE_FIGURES, SEQUENCE_SECTIONS
from models.data import load_digits_split
from models.sequence import BatchNormSequenceLSTM, SequenceLSTM
from models.sequence_data import resample_rows
from service.webdata import LENGTH_PLOT

STEPS = 6
ROUNDING = 1e-5  # another batch, other kernels: float32 rounding, not a dependence


@pytest.fixture(scope="module")
def split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits_split()
    return data.test.images[:48], data.test.labels[:48], data.validation.images[:40]


@pytest.fixture(scope="module")
def models(split: tuple[torch.Tensor, ...]) -> tuple[SequenceLSTM, BatchNormSequenceLSTM]:
    torch.manual_seed(0)
    ln, bn = SequenceLSTM(hidden=8).eval(), BatchNormSequenceLSTM(hidden=8, max_steps=STEPS)
    with torch.no_grad():
        for length in range(2, STEPS + 1):
            bn.train()(resample_rows(split[0], length))
    return ln, bn.eval()


def _unchanged(model: torch.nn.Module) -> Callable[[], bool]:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return lambda: all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


LENGTHS = [2, 4, 6, 8, 14]  # 8: the report quotes the image's own length


@pytest.fixture(scope="module")
def report(models: tuple[Any, Any], split: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """The three demonstrations, once for the module; the models must come back unchanged."""
    ln, bn = models
    same = _unchanged(bn), _unchanged(ln)
    images, labels, validation = split
    result = {
        "length_accuracy": demos.demo_length_accuracy(
            ln, bn, images, labels, lengths=LENGTHS, alone_lengths=(8,)
        ),
        "padding": demos.demo_padding(ln, bn, images, labels, validation, batch_size=16, passes=3),
        "alone_vs_mixed": demos.demo_alone_vs_mixed(ln, bn, images, batch_size=4, companions=4),
    }
    assert all(check() for check in same) and not bn.training
    return result


def test_length_accuracy_policies_agree_inside_and_are_all_measured(
    report: dict[str, Any],
) -> None:
    s = report["length_accuracy"]
    assert s["lengths"] == LENGTHS and s["batchnorm_steps"] == STEPS
    assert len(s["LayerNorm"]) == len(LENGTHS)
    policies = s["BatchNorm"]
    assert set(policies) == {"last", "pooled", "batch"}
    for i, n in enumerate(LENGTHS):
        if n <= STEPS:  # every policy is the same computation where statistics exist
            assert policies["last"][i] == policies["pooled"][i] == policies["batch"][i]
    assert s["batch_alone"]["lengths"] == [8] and 0 <= s["batch_alone"]["accuracy"][0] <= 1
    groups = s["summary"]["lengths"]  # around the training range, 4..12
    assert groups == {"inside": [4, 6, 8], "below": [2], "above": [14]}


def test_padding_counts_real_rows_and_leaves_layernorm_alone(report: dict[str, Any]) -> None:
    s = report["padding"]
    lengths = torch.tensor(s["lengths"])
    steps = s["steps"]
    assert steps["real_rows"] == [int((lengths > t).sum()) for t in range(int(lengths.max()))]
    # Step 0: every row is real (lengths >= 4), so counting "padding" changes nothing.
    assert steps["mean_shift_std"][0] == 0 and abs(steps["variance_ratio"][0] - 1) < ROUNDING
    assert steps["real_rows"][-1] < 16 and steps["mean_shift_std"][-1] > 0.01
    assert s["batchnorm_train"]["max_abs_logit_difference"] > ROUNDING
    assert max(s["layernorm_padded_vs_alone"].values()) <= ROUNDING
    drift = s["drift"]
    assert drift["lengths"] == list(range(4, 13))
    assert max(drift["running_mean_change"]["untouched"]) == 0
    for name in ("equal_lengths", "padding_masked", "padding_counted"):
        assert max(drift["running_mean_change"][name]) > 0, name


def test_one_sequence_alone_vs_in_mixed_batches(report: dict[str, Any]) -> None:
    s = report["alone_vs_mixed"]
    for name in ("LayerNorm eval", "LayerNorm train", "BatchNorm eval"):
        assert s[name]["max_abs_difference"] <= ROUNDING, name
        assert s[name]["prediction_changed"] == 0
    for name in ("BatchNorm train, padding masked", "BatchNorm train, padding counted"):
        assert s[name]["max_abs_difference"] > ROUNDING and "eval" in s[name]["compared_with"]
    # Alone in train mode BatchNorm sees a batch of one: any input, the same answer.
    assert s["batchnorm_train_alone_any_input"] <= 1e-6


def test_sections_and_figures_read_the_json(report: dict[str, Any], tmp_path: Any) -> None:
    for section in SEQUENCE_SECTIONS:
        title, text = section(report)
        assert title[:3] in {"10.", "11.", "12."} and "%" in text
    # The page serves the length figure under this name (service/webdata.py).
    assert f"{next(iter(SEQUENCE_FIGURES))}.png" == LENGTH_PLOT
    files = write_plots(report, tmp_path, SEQUENCE_FIGURES)
    assert sorted(files) == sorted(SEQUENCE_FIGURES)
    assert all((tmp_path / f).read_bytes().startswith(b"\x89PNG") for f in files.values())
