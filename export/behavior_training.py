"""The behaviour report's own training: with and without the norms (demonstration 8), and the
per-step BatchNorm twin of ``digits_sequence`` (demonstrations 10-12).

Demonstration 8: same architecture, learning rate and seeds; only the normalization layers
are swapped for identities, so the curves show what BatchNorm and LayerNorm change in
training on digits. The BatchNorm twin is trained with ``digits_sequence``'s recipe, seed and
hidden size; it is not served, so its checkpoint sits beside the default models' ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.behavior import _NORMS, Log, _mean_std
from export.checkpoint import load_into, save_safetensors
from models import ModelSpec
from models.data import Digits
from models.sequence import BatchNormSequenceLSTM
from models.train import TrainResult, evaluate, train

SEQUENCE_BATCHNORM = "digits_sequence_batchnorm"

# ---------------------------------------------------------------------------- 8


def without_norms(model: nn.Module) -> nn.Module:
    """``model`` (changed in place and returned) with every BatchNorm and LayerNorm replaced
    by an identity, and a zero bias on each bias-free conv/linear layer for the shift the
    norms provided. Weights stay, so the variant starts where the original does."""
    norms = [n for n, m in model.named_modules() if isinstance(m, _NORMS)]
    for name in norms:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.Identity())
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear) and layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
    return model


def demo_training_curves(
    families: dict[str, tuple[ModelSpec, str, str]],
    data: Digits,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 10,
    target: float = 0.95,
    log: Log = lambda line: None,
) -> dict[str, Any]:
    """Per family (name → (spec, label with its norms, label without)): validation curves
    with and without the norms at the recipe's learning rate, same initial weights and
    batch order per seed."""
    result: dict[str, Any] = {"seeds": list(seeds), "epochs": epochs, "target_accuracy": target}
    for family, (spec, with_norms, without) in families.items():
        variants: dict[str, Any] = {}
        for label, strip in ((with_norms, False), (without, True)):
            runs = []
            for seed in seeds:
                torch.manual_seed(seed)
                net = without_norms(spec.build()) if strip else spec.build()
                trained = train(spec, data, model=net, epochs=epochs, seed=seed, progress=None)
                runs.append(_curve_stats(trained, spec, data, target))
                best = trained.history[trained.best_epoch - 1].validation_accuracy
                log(f"[behavior] {label} seed {seed}: val acc {best:.2%}, {trained.seconds:.1f} s")
            variants[label] = _aggregate(runs)
        result[family] = {"lr": spec.recipe.lr, "variants": variants}
    return result


def _curve_stats(
    trained: TrainResult, spec: ModelSpec, data: Digits, target: float
) -> dict[str, Any]:
    hits = [h.epoch for h in trained.history if h.validation_accuracy >= target]
    # The gap uses the test split: validation chose the kept epoch, so it is biased upward.
    train_loss, train_accuracy = evaluate(trained.model, spec, data.train)
    test_loss, test_accuracy = evaluate(trained.model, spec, data.test)
    return {
        "validation_accuracy": [h.validation_accuracy for h in trained.history],
        "validation_loss": [h.validation_loss for h in trained.history],
        "epochs_to_target": hits[0] if hits else None,
        "train_accuracy": train_accuracy,
        "test_accuracy": test_accuracy,
        "accuracy_gap": train_accuracy - test_accuracy,
        "loss_gap": test_loss - train_loss,
    }


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {"runs": runs}
    for key in ("validation_accuracy", "validation_loss"):
        table = np.array([r[key] for r in runs])
        result[key] = {"mean": table.mean(0).tolist(), "std": table.std(0).tolist()}
    reached = [r["epochs_to_target"] for r in runs if r["epochs_to_target"] is not None]
    result["epochs_to_target"] = {**_mean_std(reached), "reached": len(reached)}
    for key in ("train_accuracy", "test_accuracy", "accuracy_gap", "loss_gap"):
        result[key] = _mean_std([r[key] for r in runs])
    return result


# ---------------------------------------------------------------------------- 10-12


def trained_sequence_batchnorm(
    spec: ModelSpec, data: Digits, checkpoints: Path, log: Log = lambda line: None
) -> BatchNormSequenceLSTM:
    """The per-step BatchNorm LSTM trained like ``spec`` (``digits_sequence``: same recipe,
    seed and hidden size), from its checkpoint when there is one; in eval mode."""
    checkpoint = checkpoints / f"{SEQUENCE_BATCHNORM}.safetensors"
    if checkpoint.exists():
        loaded = load_into(BatchNormSequenceLSTM(), checkpoint)
        assert isinstance(loaded, BatchNormSequenceLSTM)
        return loaded.eval()
    log(f"[{SEQUENCE_BATCHNORM}] no checkpoint at {checkpoint}: training")
    torch.manual_seed(spec.recipe.seed)
    result = train(spec, data, model=BatchNormSequenceLSTM(), progress=log)
    save_safetensors(
        result.model,
        checkpoint,
        {"model": SEQUENCE_BATCHNORM, "test_accuracy": f"{result.test_accuracy:.4f}"},
    )
    assert isinstance(result.model, BatchNormSequenceLSTM)
    return result.model
