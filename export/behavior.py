"""How BatchNorm and LayerNorm behave in training and in inference, measured.

Each ``demo_*`` function is one demonstration: it runs on the models and inputs it is given
(the project's trained models in the report, small ones in the tests), works on deep copies
so the caller's models never change, and returns a JSON-able dict of measured numbers.
``export.behavior_report.run_behavior`` runs them all on the default models and writes the
report; ``export.behavior_plots`` draws it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from export.to_onnx import export_onnx
from models import ModelSpec
from models.data import Digits
from models.norms import ReferenceBatchNorm
from models.train import TrainResult, evaluate, train

Log = Callable[[str], None]
ACCURACY_BATCH_SIZES = (1, 2, 8, 64, 512)
SPREAD_BATCH_SIZES = (2, 8, 64)
COMPANION_BATCHES = 32
DRIFT_PASSES = 18
KERAS_MOMENTUM = 0.99  # Keras' default: moving = momentum·moving + (1 − momentum)·batch
TORCH_MOMENTUM = 0.1  # PyTorch's default: running = (1 − momentum)·running + momentum·batch


# ---------------------------------------------------------------------------- helpers


def train_copy(model: nn.Module, *, dropout: bool) -> nn.Module:
    """A deep copy in train mode; with ``dropout=False`` every dropout is off, so only the
    normalization layers' train-mode behaviour is left to see."""
    copied = copy.deepcopy(model).train()
    if not dropout:
        for module in copied.modules():
            # nn.Dropout, and attention modules that read self.training for their dropout_p.
            if isinstance(module, nn.modules.dropout._DropoutNd) or isinstance(
                getattr(module, "dropout", None), float
            ):
                module.eval()
    return copied


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor) -> float:
    predicted = torch.as_tensor(logits).argmax(dim=1)
    return float((predicted == labels).float().mean())


def _max_abs(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


def _stats_change(before: dict[str, torch.Tensor], model: nn.Module) -> dict[str, float]:
    """Largest change of any running mean/variance, and of the batch counter."""
    now = model.state_dict()
    moved = {"running_mean": 0.0, "running_var": 0.0, "num_batches_tracked": 0.0}
    for key, old in before.items():
        kind = key.rsplit(".", 1)[-1]
        if kind in moved:
            delta = (now[key].double() - old.double()).abs().max().item()
            moved[kind] = max(moved[kind], delta)
    return moved


# ---------------------------------------------------------------------------- 1, 2, 3


def demo_batch_dependence(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_sizes: Sequence[int] = SPREAD_BATCH_SIZES,
    companions: int = COMPANION_BATCHES,
    seed: int = 0,
) -> dict[str, Any]:
    """Sample 0's logits in ``companions`` batches of random other samples: BatchNorm in
    train mode (dropout off, so the spread is BatchNorm's alone) versus eval mode."""
    modes = {"train": train_copy(model, dropout=False), "eval": copy.deepcopy(model).eval()}
    generator = torch.Generator().manual_seed(seed)
    reference = _logits(modes["eval"], images[:1])[0]
    result: dict[str, Any] = {"batch_sizes": list(batch_sizes), "companion_batches": companions}
    for mode, net in modes.items():
        rows: dict[str, list[Any]] = {"logit_range": [], "prediction_flips": [], "top_prob": []}
        for size in batch_sizes:
            outputs = []
            for _ in range(companions):
                others = torch.randperm(len(images) - 1, generator=generator)[: size - 1] + 1
                outputs.append(_logits(net, images[torch.cat([torch.tensor([0]), others])])[0])
            stacked = torch.stack(outputs)
            # Max over classes of (max − min over companion batches): 0 means independent.
            rows["logit_range"].append(float((stacked.max(0)[0] - stacked.min(0)[0]).max()))
            flips = stacked.argmax(1) != reference.argmax()
            rows["prediction_flips"].append(float(flips.float().mean()))
            rows["top_prob"].append(stacked.softmax(1)[:, reference.argmax()].tolist())
        result[mode] = rows
    return result


def demo_train_vs_eval_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_sizes: Sequence[int] = ACCURACY_BATCH_SIZES,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy on the same samples in eval mode and in train mode at each batch size.

    Uses the largest batch size's worth of samples so every batch is full and every mode and
    batch size sees exactly the same samples; ``repeats`` reshuffles the batches.
    """
    count = max(batch_sizes)
    if len(images) < count:
        raise ValueError(f"{len(images)} samples are fewer than the batch size {count}")
    nets = {
        "eval": copy.deepcopy(model).eval(),
        "train": train_copy(model, dropout=True),  # the real mistake: model.train()
        "train_no_dropout": train_copy(model, dropout=False),  # BatchNorm's share alone
    }
    generator = torch.Generator().manual_seed(seed)
    runs: dict[str, list[list[float | None]]] = {k: [] for k in [*nets, "train_one_class"]}
    errors: dict[str, str] = {}
    for _ in range(repeats):
        pick = torch.randperm(len(images), generator=generator)[:count]
        # Sorted by label: batches of (mostly) one class, as when one client sends many
        # similar requests that a server batches together.
        sorted_pick = pick[labels[pick].argsort(stable=True)]
        plans = {name: (net, pick) for name, net in nets.items()}
        plans["train_one_class"] = (nets["train"], sorted_pick)
        for name, (net, order) in plans.items():
            accuracies: list[float | None] = []
            for size in batch_sizes:
                try:
                    chunks = [_logits(net, images[c]) for c in order.split(size)]
                    accuracies.append(_accuracy(torch.cat(chunks), labels[order]))
                except ValueError as exc:  # BatchNorm1d with one value per channel
                    errors[f"{name}@{size}"] = str(exc).splitlines()[0]
                    accuracies.append(None)
            runs[name].append(accuracies)
    summary: dict[str, Any] = {"batch_sizes": list(batch_sizes), "samples": count}
    for name, table in runs.items():
        columns = list(zip(*table, strict=True))
        summary[name] = {
            "mean": [None if None in c else float(np.mean(c)) for c in columns],  # type: ignore[arg-type]
            "std": [None if None in c else float(np.std(c)) for c in columns],  # type: ignore[arg-type]
        }
    summary["errors"] = errors
    return summary


def demo_running_stats_drift(
    model: nn.Module,
    validation: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    passes: int = DRIFT_PASSES,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Train-mode forward passes under ``no_grad`` with no optimizer, then eval accuracy.

    Two scenarios: "validating" on held-out batches without ``model.eval()``, and a warm-up
    on random tensors (a common serving smoke test). Works on copies of ``model``.
    """
    generator = torch.Generator().manual_seed(seed)
    val_batches = validation.split(batch_size)
    scenarios = {
        "validation_batches": [val_batches[i % len(val_batches)] for i in range(passes)],
        "random_warmup": [
            torch.randn((batch_size, *validation.shape[1:]), generator=generator)
            for _ in range(passes)
        ],
    }
    caller = _state(model)
    reference = _logits(copy.deepcopy(model).eval(), test_images)
    result: dict[str, Any] = {"passes": list(range(passes + 1)), "batch_size": batch_size}
    for name, batches in scenarios.items():
        net = copy.deepcopy(model)
        before = _state(net)
        accuracy, drift = [_accuracy(reference, test_labels)], [0.0]
        for batch in batches:
            net.train()
            with torch.no_grad():  # no gradients, no optimizer: the statistics move anyway
                net(batch)
            out = _logits(net.eval(), test_images)
            accuracy.append(_accuracy(out, test_labels))
            drift.append(_max_abs(out, reference))
        result[name] = {
            "eval_accuracy": accuracy,
            "max_abs_logit_change": drift,
            "stats_change": _stats_change(before, net),
        }
    result["caller_unchanged"] = _unchanged(model, caller)
    return result


# ---------------------------------------------------------------------------- 4, 5


def demo_single_value_batchnorm(channels: int = 4, seed: int = 0) -> dict[str, Any]:
    """Train-mode BatchNorm with one value per channel, and what two values give instead."""
    generator = torch.Generator().manual_seed(seed)
    cases = {
        "BatchNorm1d[1,C]": (nn.BatchNorm1d(channels), (1, channels)),
        "BatchNorm2d[1,C,1,1]": (nn.BatchNorm2d(channels), (1, channels, 1, 1)),
        "BatchNorm2d[1,C,2,2]": (nn.BatchNorm2d(channels), (1, channels, 2, 2)),
        "ReferenceBatchNorm[1,C]": (ReferenceBatchNorm(channels), (1, channels)),
    }
    result: dict[str, Any] = {}
    for name, (bn, shape) in cases.items():
        x = torch.randn(shape, generator=generator)
        counter = bn.num_batches_tracked
        entry: dict[str, Any] = {"values_per_channel": math.prod(shape) // channels}
        try:
            bn.train()(x)
            entry["train"] = "ran"
        except (ValueError, RuntimeError) as exc:
            entry["train"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        # torch counts the batch before it checks it: the failed call still counted.
        entry["num_batches_tracked_after"] = int(counter) if counter is not None else None
        entry["eval_output_finite"] = bool(torch.isfinite(bn.eval()(x)).all())
        result[name] = entry
    # Two values per channel: the normalized values are ±1 whatever the inputs are.
    bn = nn.BatchNorm1d(channels, affine=False).train()
    two = bn(torch.randn((2, channels), generator=generator) * 10)
    result["two_values_max_abs_deviation_from_pm1"] = float((two.abs() - 1).abs().max())
    return result


def demo_momentum_and_variance(
    channels: int = 3, steps: int = 400, batch: int = 64, seed: int = 0
) -> dict[str, Any]:
    """Unbiased running variance versus biased normalization; momentum conventions."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, channels), generator=generator) * 2 + 1
    bn = nn.BatchNorm1d(channels, momentum=1.0, affine=False).train()
    y = bn(x)
    biased, unbiased = x.var(0, correction=0), x.var(0, correction=1)
    normalized = {k: (x - x.mean(0)) / torch.sqrt(v + bn.eps) for k, v in
                  {"biased": biased, "unbiased": unbiased}.items()}  # fmt: skip
    ratios = {}
    for n in (2, 8, 64, 4096):
        sample = torch.randn((n, 1), generator=generator)
        ratios[str(n)] = float(sample.var(0, correction=1) / sample.var(0, correction=0))
    # Running mean of a stream whose true mean is `target`, from the initial 0.
    target = 3.0
    stream = [torch.randn((batch, 1), generator=generator) + target for _ in range(steps)]
    layers = {
        f"torch momentum {TORCH_MOMENTUM}": nn.BatchNorm1d(1, momentum=TORCH_MOMENTUM),
        f"Keras momentum {KERAS_MOMENTUM}": nn.BatchNorm1d(1, momentum=1 - KERAS_MOMENTUM),
        "torch momentum None (cumulative)": nn.BatchNorm1d(1, momentum=None),
    }
    trajectories: dict[str, list[float]] = {name: [0.0] for name in layers}
    keras_rule = [0.0]  # Keras' own update written out, to check the conversion
    for chunk in stream:
        for name, layer in layers.items():
            layer.train()(chunk)
            trajectories[name].append(float(layer.running_mean[0]))
        keras_rule.append(
            KERAS_MOMENTUM * keras_rule[-1] + (1 - KERAS_MOMENTUM) * float(chunk.mean())
        )
    keras_name = f"Keras momentum {KERAS_MOMENTUM}"

    def steps_to(fraction: float, values: list[float]) -> int | None:
        hits = [i for i, v in enumerate(values) if abs(v - target) <= (1 - fraction) * target]
        return hits[0] if hits else None

    return {
        "batch": batch,
        "running_var_minus_unbiased": _max_abs(bn.running_var, unbiased),
        "running_var_minus_biased": _max_abs(bn.running_var, biased),
        "output_minus_biased_normalization": _max_abs(y.detach(), normalized["biased"]),
        "output_minus_unbiased_normalization": _max_abs(y.detach(), normalized["unbiased"]),
        "unbiased_over_biased_ratio": ratios,
        "target_mean": target,
        "running_mean": trajectories,
        "keras_rule_minus_torch_momentum": _max_abs(keras_rule, trajectories[keras_name]),
        "steps_to_95_percent": {k: steps_to(0.95, v) for k, v in trajectories.items()},
    }


# ---------------------------------------------------------------------------- 6


def demo_layernorm_invariance(
    models: dict[str, tuple[nn.Module, torch.Tensor]],
    *,
    batch_size: int = 8,
    companions: int = COMPANION_BATCHES,
    seed: int = 0,
) -> dict[str, Any]:
    """Per model (name → (model, inputs)): train versus eval mode (dropout off) and one
    sample's output across companion batches, in both modes; batch 1 versus the full batch."""
    result: dict[str, Any] = {}
    for name, (model, x) in models.items():
        generator = torch.Generator().manual_seed(seed)
        eval_net, train_net = copy.deepcopy(model).eval(), train_copy(model, dropout=False)
        spreads = {}
        for mode, net in (("train", train_net), ("eval", eval_net)):
            outs = []
            for _ in range(companions):
                others = torch.randperm(len(x) - 1, generator=generator)[: batch_size - 1] + 1
                outs.append(_logits(net, x[torch.cat([torch.tensor([0]), others])])[0])
            stacked = torch.stack(outs)
            spreads[mode] = float((stacked.max(0)[0] - stacked.min(0)[0]).max())
        result[name] = {
            "norm_layers": sorted(
                {
                    type(m).__name__
                    for m in model.modules()
                    if isinstance(m, nn.LayerNorm | _BatchNorm)
                }
            ),
            "train_minus_eval": _max_abs(_logits(train_net, x), _logits(eval_net, x)),
            "companion_spread_train": spreads["train"],
            "companion_spread_eval": spreads["eval"],
            # Different batch sizes may pick other kernels: rounding, not batch dependence.
            "batch1_minus_full_batch_eval": _max_abs(
                torch.cat([_logits(eval_net, x[i : i + 1]) for i in range(min(len(x), 64))]),
                _logits(eval_net, x)[:64],
            ),
        }
    return result


# ---------------------------------------------------------------------------- 7, 9


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # Both exporters print progress and warn about train mode and deprecations; the report
    # measures those consequences instead.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _session(model: bytes | Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The exported graph's own numbers and cost, not onnxruntime's rewrites of it.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _measure_onnx(
    proto: onnx.ModelProto, x: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor
) -> dict[str, Any]:
    session = _session(proto.SerializeToString())
    feed_name = session.get_inputs()[0].name
    first, second = (session.run(None, {feed_name: x.numpy()})[0] for _ in range(2))
    singles = np.concatenate([session.run(None, {feed_name: x[i : i + 1].numpy()})[0]
                              for i in range(len(x))])  # fmt: skip
    training_bn = [
        n for n in proto.graph.node if n.op_type == "BatchNormalization"
        and any(a.name == "training_mode" and a.i for a in n.attribute)
    ]  # fmt: skip
    ops = [n.op_type for n in proto.graph.node]
    return {
        "batchnorm_nodes": ops.count("BatchNormalization"),
        "batchnorm_training_mode_nodes": len(training_bn),
        "dropout_nodes": ops.count("Dropout"),
        "run_to_run_max_abs": _max_abs(first, second),
        "vs_torch_eval_max_abs": _max_abs(first, reference),
        "accuracy_run1": _accuracy(first, labels),
        "accuracy_run2": _accuracy(second, labels),
        "accuracy_batch1": _accuracy(singles, labels),
        "batch1_vs_full_batch_max_abs": _max_abs(singles, first),
    }


def demo_export_consequences(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    work_dir: Path,
    *,
    input_name: str = "input",
    output_name: str = "output",
) -> dict[str, Any]:
    """The export tool's file versus naive exports of ``model`` left in train mode, run in
    onnxruntime on ``x``. Writes ``folded.onnx`` and ``unfolded.onnx`` into ``work_dir``."""
    caller = _state(model)
    names = {"input_names": [input_name], "output_names": [output_name]}
    report = export_onnx(model, x[:8], work_dir / "folded.onnx", **names, samples=x,
                         unfolded_path=work_dir / "unfolded.onnx")  # fmt: skip
    reference = _logits(copy.deepcopy(model).eval(), x)
    variants = {"export_onnx": _measure_onnx(onnx.load(str(report.path)), x, labels, reference)}
    naive = copy.deepcopy(model).train()
    before = _state(naive)
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            naive, (x[:2],), dynamo=True, **names, external_data=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=report.opset,
        )  # fmt: skip
    variants["dynamo_train_mode"] = _measure_onnx(program.model_proto, x, labels, reference)
    variants["dynamo_train_mode"]["exported_copy_stats_change"] = _stats_change(before, naive)
    for mode in ("PRESERVE", "TRAINING"):
        naive = copy.deepcopy(model).train()
        before, buffer = _state(naive), io.BytesIO()
        with _quiet():
            torch.onnx.export(
                naive, (x[:2],), buffer, dynamo=False, **names, opset_version=report.opset,
                training=getattr(torch.onnx.TrainingMode, mode),
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            )  # fmt: skip
        proto = onnx.load_from_string(buffer.getvalue())
        key = f"torchscript_{mode.lower()}"
        variants[key] = _measure_onnx(proto, x, labels, reference)
        variants[key]["exported_copy_stats_change"] = _stats_change(before, naive)
    return {
        "samples": len(x),
        "parity_max_abs_error": report.parity_max_abs_error,
        "parity_bound": report.parity_bound,
        "bn_folded": report.bn_folded,
        "variants": variants,
        "caller_unchanged": _unchanged(model, caller),
    }


def demo_folding(
    folded: Path,
    unfolded: Path,
    x: torch.Tensor,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 30,
) -> dict[str, Any]:
    """Graph size and single-thread onnxruntime latency (optimizations off) of the folded
    versus the unfolded file, timed interleaved so drift in machine load hits both alike."""
    files = {"unfolded": unfolded, "folded": folded}
    result: dict[str, Any] = {}
    for name, path in files.items():
        proto = onnx.load(str(path))
        ops = [n.op_type for n in proto.graph.node]
        result[name] = {
            "nodes": len(ops),
            "batchnorm_nodes": ops.count("BatchNormalization"),
            "params": int(sum(np.prod(t.dims) for t in proto.graph.initializer)),
            "op_types": {op: ops.count(op) for op in sorted(set(ops))},
        }
    sessions = {name: _session(path, threads=1) for name, path in files.items()}
    feed = sessions["folded"].get_inputs()[0].name
    outs = {n: s.run(None, {feed: x.numpy()})[0] for n, s in sessions.items()}
    result["folded_vs_unfolded_max_abs"] = _max_abs(outs["folded"], outs["unfolded"])
    latency: dict[str, Any] = {}
    for size in batch_sizes:
        batch = {feed: x[:size].numpy()}
        inner = max(1, 64 // size)
        times: dict[str, list[float]] = {name: [] for name in files}
        for r in range(repeats):
            order = list(files) if r % 2 == 0 else list(reversed(files))
            for name in order:
                started = time.perf_counter()
                for _ in range(inner):
                    sessions[name].run(None, batch)
                times[name].append((time.perf_counter() - started) / inner * 1e3)
        medians = {name: float(np.median(t)) for name, t in times.items()}
        latency[str(size)] = {
            "median_ms": medians,
            "unfolded_over_folded": medians["unfolded"] / medians["folded"],
        }
    result["latency"] = latency
    result["repeats"] = repeats
    return result


# ---------------------------------------------------------------------------- 8


def without_norms(model: nn.Module) -> nn.Module:
    """``model`` (changed in place and returned) with every BatchNorm and LayerNorm replaced
    by an identity, and a zero bias on every bias-free conv/linear layer: the shift the norms
    provided. Weights stay as they were, so the variant starts where the original does."""
    norms = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm | nn.LayerNorm)]
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
    """Per family (name → (spec, label with norms, label without)): validation curves of the
    model with and without its norms, same learning rate, initial weights and shuffles."""
    result: dict[str, Any] = {"seeds": list(seeds), "epochs": epochs, "target_accuracy": target}
    for family, (spec, with_label, without_label) in families.items():
        variants: dict[str, Any] = {}
        for label, strip in ((with_label, False), (without_label, True)):
            runs = []
            for seed in seeds:
                torch.manual_seed(seed)
                net = without_norms(spec.build()) if strip else spec.build()
                started = time.perf_counter()
                trained = train(spec, data, model=net, epochs=epochs, seed=seed, progress=None)
                runs.append(_curve_stats(trained, spec, data, target))
                log(f"[behavior] {label} seed {seed}: best val acc "
                    f"{max(runs[-1]['validation_accuracy']):.2%}, "
                    f"{time.perf_counter() - started:.1f} s")  # fmt: skip
            variants[label] = _aggregate(runs)
        result[family] = {"lr": spec.recipe.lr, "variants": variants}
    return result


def _curve_stats(trained: TrainResult, spec: ModelSpec, data: Digits, target: float) -> dict:
    history = trained.history
    hits = [h.epoch for h in history if h.validation_accuracy >= target]
    # The gap uses the test split: validation picked the kept epoch, so it is biased upward.
    train_loss, train_acc = evaluate(trained.model, spec, data.train)
    test_loss, test_acc = evaluate(trained.model, spec, data.test)
    return {
        "validation_accuracy": [h.validation_accuracy for h in history],
        "validation_loss": [h.validation_loss for h in history],
        "epochs_to_target": hits[0] if hits else None,
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "accuracy_gap": train_acc - test_acc,
        "loss_gap": test_loss - train_loss,
    }


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def mean_std(values: Sequence[float]) -> dict[str, float | None]:
        if not values:
            return {"mean": None, "std": None}
        return {"mean": float(np.mean(values)), "std": float(np.std(values))}

    summary: dict[str, Any] = {"runs": runs}
    for key in ("validation_accuracy", "validation_loss"):
        columns = np.array([r[key] for r in runs])
        summary[key] = {"mean": columns.mean(0).tolist(), "std": columns.std(0).tolist()}
    reached = [r["epochs_to_target"] for r in runs if r["epochs_to_target"] is not None]
    summary["epochs_to_target"] = {**mean_std(reached), "reached": len(reached)}
    for key in ("train_accuracy", "test_accuracy", "accuracy_gap", "loss_gap"):
        summary[key] = mean_std([r[key] for r in runs])
    return summary
