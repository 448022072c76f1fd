"""How BatchNorm and LayerNorm behave in training and in inference, measured.

Each ``demo_*`` function is one demonstration: it runs on the models and inputs it is given
(the project's trained models in the report, small ones in the tests), works on deep copies
so the caller's models never change, and returns a JSON-able dict of measured numbers.
``export.behavior_report.run_behavior`` runs them on the default models and writes the
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
from models.norms import ReferenceBatchNorm

Log = Callable[[str], None]
ACCURACY_BATCH_SIZES = (1, 2, 8, 64, 512)
SPREAD_BATCH_SIZES = (2, 8, 64)
COMPANION_BATCHES = 32
DRIFT_PASSES = 18
TORCH_MOMENTUM = 0.1  # PyTorch's default: running = (1 − momentum)·running + momentum·batch
KERAS_MOMENTUM = 0.99  # Keras' default: moving = momentum·moving + (1 − momentum)·batch
_NORMS = (_BatchNorm, nn.LayerNorm)


# ---------------------------------------------------------------------------- helpers


def train_copy(model: nn.Module, *, dropout: bool) -> nn.Module:
    """A deep copy in train mode; with ``dropout=False`` every dropout is off, so only the
    normalization layers' train-mode behaviour is left to see."""
    copied = copy.deepcopy(model).train()
    if not dropout:
        for module in copied.modules():
            # nn.Dropout, and attention modules that read self.training for their dropout_p.
            dropout_p = getattr(module, "dropout", None)
            if isinstance(module, nn.modules.dropout._DropoutNd) or isinstance(dropout_p, float):
                module.eval()
    return copied


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor) -> float:
    return float((torch.as_tensor(logits).argmax(dim=1) == labels).float().mean())


def _max_abs(a: torch.Tensor | np.ndarray | list, b: torch.Tensor | np.ndarray | list) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
    present = [v for v in values if v is not None]
    if not present or len(present) < len(values):
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(present)), "std": float(np.std(present))}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


def _stats_change(before: dict[str, torch.Tensor], model: nn.Module) -> dict[str, float]:
    """The largest change of any running mean, running variance and batch counter."""
    moved = {"running_mean": 0.0, "running_var": 0.0, "num_batches_tracked": 0.0}
    for key, now in model.state_dict().items():
        kind = key.rsplit(".", 1)[-1]
        if kind in moved:
            delta = float((now.double() - before[key].double()).abs().max())
            moved[kind] = max(moved[kind], delta)
    return moved


def _companion_outputs(
    net: nn.Module, x: torch.Tensor, size: int, count: int, generator: torch.Generator
) -> torch.Tensor:
    """Sample 0's outputs [count, ...] in ``count`` batches with random other samples."""
    outputs = []
    for _ in range(count):
        others = torch.randperm(len(x) - 1, generator=generator)[: size - 1] + 1
        outputs.append(_logits(net, x[torch.cat([torch.zeros(1, dtype=torch.long), others])])[0])
    return torch.stack(outputs)


def _range(stacked: torch.Tensor) -> float:
    # Max over outputs of (max − min over batches): 0 exactly means batch-independent.
    return float((stacked.amax(0) - stacked.amin(0)).max())


# ---------------------------------------------------------------------------- 1, 2, 3


def demo_batch_dependence(
    model: nn.Module,
    x: torch.Tensor,
    *,
    batch_sizes: Sequence[int] = SPREAD_BATCH_SIZES,
    companions: int = COMPANION_BATCHES,
    seed: int = 0,
) -> dict[str, Any]:
    """Sample 0's logits across batches of random companions, BatchNorm in train mode
    (dropout off, so the spread is BatchNorm's alone) versus eval mode."""
    modes = {"train": train_copy(model, dropout=False), "eval": copy.deepcopy(model).eval()}
    generator = torch.Generator().manual_seed(seed)
    predicted = int(_logits(modes["eval"], x[:1])[0].argmax())
    result: dict[str, Any] = {"batch_sizes": list(batch_sizes), "companion_batches": companions}
    for mode, net in modes.items():
        rows: dict[str, list[Any]] = {"logit_range": [], "prediction_flips": [], "probability": []}
        for size in batch_sizes:
            stacked = _companion_outputs(net, x, size, companions, generator)
            rows["logit_range"].append(_range(stacked))
            rows["prediction_flips"].append(float((stacked.argmax(1) != predicted).float().mean()))
            # The probability of the class eval mode predicts, per companion batch.
            rows["probability"].append(stacked.softmax(1)[:, predicted].tolist())
        result[mode] = rows
    return result


def demo_train_vs_eval_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_sizes: Sequence[int] = ACCURACY_BATCH_SIZES,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy in eval mode and in train mode at each batch size, on the same samples.

    Takes the largest batch size's worth of samples, so every batch is full and every mode
    and size sees the same samples; ``repeats`` reshuffles them.
    """
    count = max(batch_sizes)
    if len(x) < count:
        raise ValueError(f"{len(x)} samples are fewer than the largest batch size {count}")
    nets = {
        "eval": copy.deepcopy(model).eval(),
        "train": train_copy(model, dropout=True),  # the real mistake: model.train()
        "train_no_dropout": train_copy(model, dropout=False),  # BatchNorm's share alone
    }
    generator = torch.Generator().manual_seed(seed)
    runs: dict[str, list[list[float | None]]] = {k: [] for k in [*nets, "train_one_class"]}
    errors: dict[str, str] = {}
    for _ in range(repeats):
        pick = torch.randperm(len(x), generator=generator)[:count]
        plans = {name: (net, pick) for name, net in nets.items()}
        # Sorted by label: batches of mostly one class, as when one client's many similar
        # requests are batched together.
        plans["train_one_class"] = (nets["train"], pick[labels[pick].argsort(stable=True)])
        for name, (net, order) in plans.items():
            accuracies: list[float | None] = []
            for size in batch_sizes:
                try:
                    out = torch.cat([_logits(net, x[chunk]) for chunk in order.split(size)])
                    accuracies.append(_accuracy(out, labels[order]))
                except ValueError as exc:  # BatchNorm1d with one value per channel
                    errors[f"{name} at batch {size}"] = str(exc).splitlines()[0]
                    accuracies.append(None)
            runs[name].append(accuracies)
    result: dict[str, Any] = {"batch_sizes": list(batch_sizes), "samples": count}
    for name, table in runs.items():
        columns = [_mean_std(column) for column in zip(*table, strict=True)]
        result[name] = {key: [c[key] for c in columns] for key in ("mean", "std")}
    result["errors"] = errors
    return result


def demo_running_stats_drift(
    model: nn.Module,
    validation: torch.Tensor,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    passes: int = DRIFT_PASSES,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Train-mode forward passes under ``no_grad`` with no optimizer step, and the eval-mode
    accuracy on ``x`` after each: "validating" on held-out batches without ``model.eval()``,
    and a warm-up on random tensors (a common serving smoke test)."""
    generator = torch.Generator().manual_seed(seed)
    held_out = validation.split(batch_size)
    shape = (batch_size, *x.shape[1:])
    scenarios = {
        "validation_batches": [held_out[i % len(held_out)] for i in range(passes)],
        "random_warmup": [torch.randn(shape, generator=generator) for _ in range(passes)],
    }
    caller = _state(model)
    reference = _logits(copy.deepcopy(model).eval(), x)
    result: dict[str, Any] = {"passes": list(range(passes + 1)), "batch_size": batch_size}
    for name, batches in scenarios.items():
        net = copy.deepcopy(model)
        before = _state(net)
        accuracy, change = [_accuracy(reference, labels)], [0.0]
        for batch in batches:
            _logits(net.train(), batch)  # no gradients, no optimizer: the statistics move
            out = _logits(net.eval(), x)
            accuracy.append(_accuracy(out, labels))
            change.append(_max_abs(out, reference))
        result[name] = {
            "eval_accuracy": accuracy,
            "max_abs_logit_change": change,
            "stats_change": _stats_change(before, net),
        }
    result["caller_unchanged"] = _unchanged(model, caller)
    return result


# ---------------------------------------------------------------------------- 4, 5


def demo_single_value_batchnorm(channels: int = 4, seed: int = 0) -> dict[str, Any]:
    """Train-mode BatchNorm with one value per channel, and what two values give instead."""
    generator = torch.Generator().manual_seed(seed)
    cases = {
        "BatchNorm1d [1, C]": (nn.BatchNorm1d(channels), (1, channels)),
        "BatchNorm2d [1, C, 1, 1]": (nn.BatchNorm2d(channels), (1, channels, 1, 1)),
        "BatchNorm2d [1, C, 2, 2]": (nn.BatchNorm2d(channels), (1, channels, 2, 2)),
        "ReferenceBatchNorm [1, C]": (ReferenceBatchNorm(channels), (1, channels)),
    }
    result: dict[str, Any] = {}
    for name, (bn, shape) in cases.items():
        x = torch.randn(shape, generator=generator)
        entry: dict[str, Any] = {"values_per_channel": math.prod(shape) // channels}
        try:
            bn.train()(x)
            entry["train"] = "ran"
        except (ValueError, RuntimeError) as exc:
            entry["train"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        # torch counts the batch before checking it, so a refused batch may still count.
        entry["num_batches_tracked_after"] = int(bn.num_batches_tracked)
        entry["eval_output_finite"] = bool(torch.isfinite(bn.eval()(x)).all())
        result[name] = entry
    # Two values per channel normalize to exactly ±1 (up to eps), whatever the values are.
    two = nn.BatchNorm1d(channels, affine=False)(torch.randn((2, channels), generator=generator))
    result["two_values_max_deviation_from_pm1"] = float((two.abs() - 1).abs().max())
    return result


def demo_momentum_and_variance(
    channels: int = 3, steps: int = 400, batch: int = 64, seed: int = 0
) -> dict[str, Any]:
    """Running variance (unbiased) versus the variance that normalizes (biased), and how fast
    the running mean follows a stream under PyTorch's and Keras' momentum conventions."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, channels), generator=generator) * 2 + 1
    bn = nn.BatchNorm1d(channels, momentum=1.0, affine=False)  # running = this batch's stats
    y = bn(x).detach()
    var = {"biased": x.var(0, correction=0), "unbiased": x.var(0, correction=1)}
    normalized = {k: (x - x.mean(0)) / (v + bn.eps).sqrt() for k, v in var.items()}
    ratios = {}
    for n in (2, 8, 64, 4096):
        sample = torch.randn((n, 1), generator=generator)
        ratios[str(n)] = float(sample.var(0, correction=1) / sample.var(0, correction=0))
    target = 3.0  # the stream's true mean; running means start at 0
    layers = {
        f"PyTorch momentum {TORCH_MOMENTUM}": nn.BatchNorm1d(1, momentum=TORCH_MOMENTUM),
        # Keras' momentum is the weight of the old value: PyTorch's momentum is 1 − it.
        f"Keras momentum {KERAS_MOMENTUM}": nn.BatchNorm1d(1, momentum=1 - KERAS_MOMENTUM),
        "PyTorch momentum None (cumulative)": nn.BatchNorm1d(1, momentum=None),
    }
    paths: dict[str, list[float]] = {name: [0.0] for name in layers}
    keras_rule = [torch.zeros(())]  # Keras' update rule written out, to check the conversion
    for _ in range(steps):
        chunk = torch.randn((batch, 1), generator=generator) + target
        for name, layer in layers.items():
            layer(chunk)
            paths[name].append(float(layer.running_mean[0]))
        keras_rule.append(KERAS_MOMENTUM * keras_rule[-1] + (1 - KERAS_MOMENTUM) * chunk.mean())
    close = {
        name: [i for i, v in enumerate(p) if abs(v - target) <= 0.05 * target]
        for name, p in paths.items()
    }
    return {
        "batch": batch,
        "running_var_minus_unbiased": _max_abs(bn.running_var, var["unbiased"]),
        "running_var_minus_biased": _max_abs(bn.running_var, var["biased"]),
        "output_minus_biased_normalization": _max_abs(y, normalized["biased"]),
        "output_minus_unbiased_normalization": _max_abs(y, normalized["unbiased"]),
        "unbiased_over_biased_ratio": ratios,
        "target_mean": target,
        "running_mean": paths,
        "keras_rule_minus_converted_momentum": _max_abs(
            torch.stack(keras_rule), paths[f"Keras momentum {KERAS_MOMENTUM}"]
        ),
        "steps_to_within_5_percent": {k: (v[0] if v else None) for k, v in close.items()},
    }


# ---------------------------------------------------------------------------- 6


def demo_layernorm_invariance(
    models: dict[str, tuple[nn.Module, torch.Tensor]],
    *,
    batch_size: int = 8,
    companions: int = COMPANION_BATCHES,
    seed: int = 0,
) -> dict[str, Any]:
    """Per model (name → (model, inputs)): train versus eval mode with dropout off, sample
    0's output across batches of random companions, and batch 1 versus the full batch."""
    result: dict[str, Any] = {}
    for name, (model, x) in models.items():
        generator = torch.Generator().manual_seed(seed)
        nets = {"train": train_copy(model, dropout=False), "eval": copy.deepcopy(model).eval()}
        spread = {}
        for mode, net in nets.items():
            spread[mode] = _range(_companion_outputs(net, x, batch_size, companions, generator))
        first = x[: min(len(x), 64)]
        singles = torch.cat([_logits(nets["eval"], first[i : i + 1]) for i in range(len(first))])
        norms = {type(m).__name__ for m in model.modules() if isinstance(m, _NORMS)}
        result[name] = {
            "norms": sorted(norms),
            "train_minus_eval": _max_abs(_logits(nets["train"], x), _logits(nets["eval"], x)),
            "companion_spread_train": spread["train"],
            "companion_spread_eval": spread["eval"],
            # Another batch size may pick other kernels: rounding, not batch dependence.
            "batch1_minus_full_batch_eval": _max_abs(singles, _logits(nets["eval"], first)),
        }
    return result


# ---------------------------------------------------------------------------- 7, 9


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # Both exporters print progress and warn about train mode and deprecation; the report
    # measures what those warnings are about instead.
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
    feed = session.get_inputs()[0].name
    first, second = (session.run(None, {feed: x.numpy()})[0] for _ in range(2))
    singles = np.concatenate([session.run(None, {feed: row[None].numpy()})[0] for row in x])
    ops = [n.op_type for n in proto.graph.node]
    training_bn = [
        n for n in proto.graph.node
        if n.op_type == "BatchNormalization"
        and any(a.name == "training_mode" and a.i for a in n.attribute)
    ]  # fmt: skip
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
    """The export tool's file versus naive exports of ``model`` left in train mode (by the
    dynamo exporter, and by the TorchScript one with TrainingMode PRESERVE and TRAINING), each
    run in onnxruntime on ``x``. Writes ``folded.onnx`` and ``unfolded.onnx`` into ``work_dir``."""
    caller = _state(model)
    names = (input_name, output_name)
    report = export_onnx(
        model, x[:8], work_dir / "folded.onnx", input_names=[input_name],
        output_names=[output_name], samples=x, unfolded_path=work_dir / "unfolded.onnx",
    )  # fmt: skip
    reference = _logits(copy.deepcopy(model).eval(), x)
    variants = {"export_onnx": _measure_onnx(onnx.load(str(report.path)), x, labels, reference)}
    for exporter in ("dynamo", "torchscript_preserve", "torchscript_training"):
        naive = copy.deepcopy(model).train()  # a copy: the exporters may update its statistics
        before = _state(naive)
        proto = _naive_export(naive, x[:2], names, report.opset, exporter)
        variants[exporter] = _measure_onnx(proto, x, labels, reference)
        variants[exporter]["exported_model_stats_change"] = _stats_change(before, naive)
    return {
        "samples": len(x),
        "parity_max_abs_error": report.parity_max_abs_error,
        "parity_bound": report.parity_bound,
        "bn_folded": report.bn_folded,
        "variants": variants,
        "caller_unchanged": _unchanged(model, caller),
    }


def _naive_export(
    net: nn.Module, example: torch.Tensor, names: tuple[str, str], opset: int, exporter: str
) -> onnx.ModelProto:
    """``net`` exported as it is, the way a user calling torch.onnx.export directly would."""
    inputs, outputs = [names[0]], [names[1]]
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            program = torch.onnx.export(
                net, (example,), dynamo=True, input_names=inputs, output_names=outputs,
                opset_version=opset, dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
            )  # fmt: skip
            if program is None:
                raise RuntimeError("torch.onnx.export returned no program")
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(
            net, (example,), buffer, dynamo=False, input_names=inputs, output_names=outputs,
            opset_version=opset, dynamic_axes={name: {0: "batch"} for name in names},
            training=getattr(torch.onnx.TrainingMode, exporter.split("_")[-1].upper()),
        )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def demo_folding(
    folded: Path,
    unfolded: Path,
    x: torch.Tensor,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 30,
) -> dict[str, Any]:
    """Graph size and single-thread onnxruntime latency (graph optimizations off) of the
    folded versus the unfolded file, timed interleaved so changes in load hit both alike."""
    files = {"unfolded": unfolded, "folded": folded}
    result: dict[str, Any] = {"repeats": repeats}
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
    outs = {name: s.run(None, {feed: x.numpy()})[0] for name, s in sessions.items()}
    result["folded_vs_unfolded_max_abs"] = _max_abs(outs["folded"], outs["unfolded"])
    result["latency"] = {}
    for size in batch_sizes:
        feeds, inner = {feed: x[:size].numpy()}, max(1, 64 // size)
        times: dict[str, list[float]] = {name: [] for name in files}
        for r in range(repeats):
            for name in list(files)[:: 1 if r % 2 else -1]:
                started = time.perf_counter()
                for _ in range(inner):
                    sessions[name].run(None, feeds)
                times[name].append((time.perf_counter() - started) / inner * 1e3)
        median = {name: float(np.median(t)) for name, t in times.items()}
        result["latency"][str(size)] = {
            "median_ms": median,
            "unfolded_over_folded": median["unfolded"] / median["folded"],
        }
    return result
