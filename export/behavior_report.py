"""``python -m export behavior``: run every demonstration on the default models, write the report.

The report is ``report.json`` (every measured number), one PNG per demonstration and
``report.md``, which explains each plot in a few sentences whose numbers all come from the
JSON. Nothing in the text is typed in: rerunning on another machine rewrites every number.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any

import torch

from export import behavior as demos
from export import behavior_sequence as sequences
from export import behavior_training as training
from export.behavior_plots import FIGURES, write_headline, write_plots
from export.behavior_sequence_report import SEQUENCE_FIGURES, SEQUENCE_SECTIONS
from export.build import DEFAULT_CHECKPOINTS, trained_model
from models import REGISTRY
from models.data import load_digits_split
from models.train import evaluate, shape_for
from service.webdata import REPORT_HEADLINE

DEFAULT_OUT = Path("reports/behavior")
DOCS_PLOT = Path("docs/behavior.png")
# Training curves: enough seeds for a spread and epochs to see convergence, within the
# command's two-minute budget on two cores (the other demonstrations take seconds).
CURVE_SEEDS = 3
CURVE_EPOCHS = 10
TARGET_ACCURACY = 0.95
CNN, TRANSFORMER, RECURRENT = "digits_cnn", "digits_transformer", "digits_recurrent"
SEQUENCE = "digits_sequence"

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_behavior(
    out_dir: Path = DEFAULT_OUT,
    checkpoints: Path = DEFAULT_CHECKPOINTS,
    log: Log = _stderr,
    *,
    docs_plot: Path | None = None,
    seeds: int = CURVE_SEEDS,
    epochs: int = CURVE_EPOCHS,
) -> dict[str, Any]:
    """Measure, then write report.json, the PNGs (the headline as ``REPORT_HEADLINE``) and
    report.md into ``out_dir``, and copy the headline PNG to ``docs_plot`` when given (the
    tracked README picture, so only on request).
    Returns the report dict."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_digits_split()
    models = {
        name: trained_model(spec, data, checkpoints, log)[0] for name, spec in REGISTRY.items()
    }
    cnn, spec = models[CNN], REGISTRY[CNN]
    test_x, test_y = shape_for(spec, data.test.images), data.test.labels
    # Validation + test: the held-out digits, enough for one full batch of 512.
    held_x = torch.cat([shape_for(spec, data.validation.images), test_x])
    held_y = torch.cat([data.validation.labels, test_y])
    report: dict[str, Any] = {}
    seconds: dict[str, float] = {}

    def measure(name: str, run: Callable[[], dict[str, Any]]) -> None:
        begun = time.perf_counter()
        report[name] = run()
        seconds[name] = time.perf_counter() - begun
        log(f"[behavior] {name}: {seconds[name]:.1f} s")

    # Small batches run fastest on one thread, and one thread keeps OpenMP from spinning
    # against other work on a 2-core machine; train() sets its own thread count.
    with _threads(1), tempfile.TemporaryDirectory() as tmp:
        measure("batch_dependence", lambda: demos.demo_batch_dependence(cnn, test_x))
        measure(
            "train_vs_eval_accuracy",
            lambda: demos.demo_train_vs_eval_accuracy(cnn, held_x, held_y),
        )
        validation_x = shape_for(spec, data.validation.images)
        measure(
            "running_stats_drift",
            lambda: demos.demo_running_stats_drift(cnn, validation_x, test_x, test_y),
        )
        measure("single_value_batchnorm", demos.demo_single_value_batchnorm)
        measure("momentum_and_variance", demos.demo_momentum_and_variance)
        inputs = {n: (models[n], shape_for(REGISTRY[n], data.test.images)) for n in REGISTRY}
        measure("layernorm_invariance", lambda: demos.demo_layernorm_invariance(inputs))
        work = Path(tmp)
        measure(
            "export_consequences",
            lambda: demos.demo_export_consequences(
                cnn, test_x, test_y, work, input_name=spec.input_name, output_name=spec.output_name
            ),
        )
        measure(
            "folding",
            lambda: demos.demo_folding(work / "folded.onnx", work / "unfolded.onnx", test_x),
        )
    families = {
        CNN: (spec, "with BatchNorm", "without BatchNorm"),
        RECURRENT: (REGISTRY[RECURRENT], "with LayerNorm", "without LayerNorm"),
    }
    measure(
        "training_curves",
        lambda: training.demo_training_curves(
            families, data, seeds=range(seeds), epochs=epochs, target=TARGET_ACCURACY, log=log
        ),
    )
    begun = time.perf_counter()
    ln_seq = models[SEQUENCE]
    bn_seq = training.trained_sequence_batchnorm(REGISTRY[SEQUENCE], data, checkpoints, log)
    seconds["sequence_batchnorm_model"] = time.perf_counter() - begun
    with _threads(1):
        images = data.test.images
        measure(
            "length_accuracy",
            lambda: sequences.demo_length_accuracy(ln_seq, bn_seq, images, test_y),
        )
        measure(
            "padding",
            lambda: sequences.demo_padding(ln_seq, bn_seq, images, test_y, data.validation.images),
        )
        measure("alone_vs_mixed", lambda: sequences.demo_alone_vs_mixed(ln_seq, bn_seq, images))
    report["meta"] = {
        "seconds": seconds,
        "measure_seconds": time.perf_counter() - started,
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "test_accuracy": {n: evaluate(m, REGISTRY[n], data.test)[1] for n, m in models.items()},
        "test_samples": len(data.test),
    }
    plots = write_plots(report, out_dir, {**FIGURES, **SEQUENCE_FIGURES})
    # The headline also goes beside the other plots: the web page serves it from there.
    write_headline(report, out_dir / REPORT_HEADLINE)
    if docs_plot is not None:
        docs_plot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out_dir / REPORT_HEADLINE, docs_plot)
    report["meta"]["plots"] = plots
    report["meta"]["total_seconds"] = time.perf_counter() - started
    # allow_nan=False: a NaN would mean a measurement failed; refuse to write it silently.
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(markdown(report))
    log(f"[behavior] report in {out_dir} ({report['meta']['total_seconds']:.1f} s)")
    return report


# ---------------------------------------------------------------------------- Markdown


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _sci(value: float) -> str:
    return "0 (exactly)" if value == 0 else f"{value:.1e}"


def _pm(stats: dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    if stats["mean"] is None:
        return "—"
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


def _compare(a: dict[str, Any], b: dict[str, Any], lower: str, higher: str) -> str:
    """What the data supports when comparing ``a`` with ``b`` (each a mean and std over
    seeds): a difference within the seed-to-seed spread is not called one."""
    if a["mean"] is None or b["mean"] is None:
        return "not comparable (a variant never reached the target)"
    if abs(a["mean"] - b["mean"]) <= max(a["std"], b["std"]):
        return "no clear difference (within the seed-to-seed spread)"
    return lower if a["mean"] < b["mean"] else higher


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    plots = meta["plots"]
    accuracy = ", ".join(f"`{n}` {_pct(a)}" for n, a in meta["test_accuracy"].items())
    parts = [
        "# BatchNorm and LayerNorm in training and in inference, measured\n",
        f"Generated by `python -m export behavior` in {meta['total_seconds']:.0f} s on "
        f"{meta['cpus']} CPUs (Python {meta['python']}, torch {meta['torch']}, onnxruntime "
        f"{meta['onnxruntime']}). Every number is measured in that run; `report.json` holds "
        f"all of them. Test accuracy of the default models on {meta['test_samples']} held-out "
        f"digits: {accuracy}.\n",
    ]
    for section in SECTIONS:
        title, text = section(report)
        plot = plots.get(section.__name__.removeprefix("_md_"))
        image = f"\n![{title}]({plot})\n" if plot else ""
        parts.append(f"## {title}\n{image}\n{text}\n")
    return "\n".join(parts)


def _md_batch_dependence(report: dict[str, Any]) -> tuple[str, str]:
    s = report["batch_dependence"]
    sizes, train, ev = s["batch_sizes"], s["train"], s["eval"]
    ranges = ", ".join(
        f"{r:.2f} at batch {b}" for b, r in zip(sizes, train["logit_range"], strict=True)
    )
    return "1. One sample's output depends on its batch in train mode", (
        f"The same test digit was put in {s['companion_batches']} batches of random companions. "
        f"With BatchNorm in train mode (dropout off) its logits moved by up to {ranges}, and its "
        f"predicted class changed in {_pct(train['prediction_flips'][0])} of the batches of "
        f"{sizes[0]}: BatchNorm normalizes with the batch's own mean and variance. In eval mode it "
        f"uses the running statistics, and the spread is {_sci(max(ev['logit_range']))} at every "
        "batch size."
    )


def _md_train_vs_eval_accuracy(report: dict[str, Any]) -> tuple[str, str]:
    s = report["train_vs_eval_accuracy"]
    sizes = s["batch_sizes"]
    train = ", ".join(
        f"{_pct(m)} at {b}" for b, m in zip(sizes, s["train"]["mean"], strict=True) if m is not None
    )
    one = dict(zip(sizes, s["train_one_class"]["mean"], strict=True))
    errors = "; ".join(f"{k}: `{v}`" for k, v in s["errors"].items() if k.startswith("train at"))
    return "2. Accuracy in train mode versus eval mode by batch size", (
        f"On the same {s['samples']} held-out digits (mean ± std over reshuffles in the JSON), "
        f"eval mode scores {_pct(s['eval']['mean'][0])} at every batch size. Train mode — a "
        f"forgotten `model.eval()` — scores {train}; at batch 1 it refuses ({errors}). When the "
        f"batches hold mostly one class, as when one client's similar requests are batched "
        f"together, train mode scores {_pct(one[sizes[2]])} at batch {sizes[2]} and "
        f"{_pct(one[sizes[3]])} at batch {sizes[3]}: the batch statistics then describe one "
        "class, not the data."
    )


def _md_running_stats_drift(report: dict[str, Any]) -> tuple[str, str]:
    s = report["running_stats_drift"]
    val, warm = s["validation_batches"], s["random_warmup"]
    return "3. Running statistics move on every train-mode forward pass", (
        f"{len(s['passes']) - 1} forward passes in train mode under `torch.no_grad()`, with no "
        f"optimizer, moved running_mean by up to {val['stats_change']['running_mean']:.3g} and "
        f"running_var by {val['stats_change']['running_var']:.3g} (num_batches_tracked "
        f'+{val["stats_change"]["num_batches_tracked"]:.0f}). "Validating" this way moved the '
        f"later eval-mode test accuracy from {_pct(val['eval_accuracy'][0])} to "
        f"{_pct(val['eval_accuracy'][-1])} (logits by up to "
        f"{max(val['max_abs_logit_change']):.2f}); a warm-up on random tensors took it to "
        f"{_pct(warm['eval_accuracy'][-1])}. Both ran on copies: the loaded model unchanged = "
        f"{s['caller_unchanged']}."
    )


def _md_single_value_batchnorm(report: dict[str, Any]) -> tuple[str, str]:
    s = report["single_value_batchnorm"]
    one, four = s["BatchNorm1d [1, C]"], s["BatchNorm2d [1, C, 2, 2]"]
    ref = s["ReferenceBatchNorm [1, C]"]
    return "4. BatchNorm1d in train mode refuses one value per channel", (
        f"`BatchNorm1d` on a `[1, C]` batch in train mode raises `{one['train']}`; so does "
        "`BatchNorm2d` on `[1, C, 1, 1]`, while `[1, C, 2, 2]` "
        f"({four['values_per_channel']} values per channel) {four['train']}. With one value "
        "the batch variance is 0, so every output would be the bias β whatever the input, and "
        "the unbiased variance n/(n−1) that running_var stores divides by zero. torch counts "
        f"the batch before refusing it (num_batches_tracked {one['num_batches_tracked_after']} "
        f"afterwards; the reference implementation in models/norms.py: "
        f"{ref['num_batches_tracked_after']}), and eval mode works on the same input. With two "
        "values per channel every normalized value is ±1 (max deviation "
        f"{s['two_values_max_deviation_from_pm1']:.1e}): barely better."
    )


def _md_momentum_and_variance(report: dict[str, Any]) -> tuple[str, str]:
    s = report["momentum_and_variance"]
    steps = s["steps_to_within_5_percent"]
    ratios = s["unbiased_over_biased_ratio"]
    return "5. Momentum conventions, and the biased versus unbiased variance", (
        f"After one train step with momentum 1 on a batch of {s['batch']}, running_var equals "
        f"the unbiased batch variance (max |Δ| {_sci(s['running_var_minus_unbiased'])}, versus "
        f"{s['running_var_minus_biased']:.3g} from the biased one), while the output matches "
        f"normalization by the biased variance ({_sci(s['output_minus_biased_normalization'])}) "
        f"and not by the unbiased ({s['output_minus_unbiased_normalization']:.3g}). The ratio "
        + ", ".join(f"{v:.4g} at n={n}" for n, v in ratios.items())
        + " shows it matters only for small batches. PyTorch's momentum weights the new batch, "
        f"Keras' weights the old value: Keras' rule with {demos.KERAS_MOMENTUM} matches PyTorch "
        f"with momentum {1 - demos.KERAS_MOMENTUM:.2g} to "
        f"{_sci(s['keras_rule_minus_converted_momentum'])}. The running mean came within 5 % of "
        "the stream's mean after " + ", ".join(f"{v} steps ({k})" for k, v in steps.items()) + "."
    )


def _md_layernorm_invariance(report: dict[str, Any]) -> tuple[str, str]:
    s = report["layernorm_invariance"]
    ln = [n for n in s if "LayerNorm" in s[n]["norms"]]
    bn = [n for n in s if n not in ln]
    ln_text = "; ".join(
        f"`{n}`: train − eval {_sci(s[n]['train_minus_eval'])}, companion spread "
        f"{_sci(s[n]['companion_spread_train'])} (train) and "
        f"{_sci(s[n]['companion_spread_eval'])} (eval)"
        for n in ln
    )
    bn_text = "; ".join(
        f"`{n}`: train − eval {s[n]['train_minus_eval']:.3g}, companion spread in train mode "
        f"{s[n]['companion_spread_train']:.3g}"
        for n in bn
    )
    rounding = max(s[n]["batch1_minus_full_batch_eval"] for n in s)
    return "6. LayerNorm is the same computation in training and in inference", (
        f"LayerNorm normalizes each sample over its own features, so with dropout off: {ln_text}. "
        f"The BatchNorm CNN for contrast: {bn_text}. One sample run alone versus inside a batch "
        f"of 64 differs by at most {rounding:.1e} for every model, BatchNorm's in eval mode "
        "included: floating-point rounding from kernels chosen per batch size, not a dependence "
        "on the other samples (which is exactly 0 at a fixed batch size)."
    )


def _md_export_consequences(report: dict[str, Any]) -> tuple[str, str]:
    s = report["export_consequences"]
    v = s["variants"]
    tool, dyn, ts = v["export_onnx"], v["dynamo"], v["torchscript_training"]
    pre = v["torchscript_preserve"]
    return "7. What the export does with each mode", (
        f"`export_onnx` (BatchNorm folded into an eval-mode copy) matches a float64 copy of "
        f"PyTorch eval to {s['parity_max_abs_error']:.1e} (bound {s['parity_bound']:.1e}, "
        f"from PyTorch float32's own error), is deterministic "
        f"(run to run {_sci(tool['run_to_run_max_abs'])}) and scores {_pct(tool['accuracy_run1'])} "
        f"in batches and {_pct(tool['accuracy_batch1'])} one request at a time. The default "
        f"(dynamo) exporter given the model in train mode keeps {dyn['dropout_nodes']} Dropout in "
        f"training mode: two runs on the same {s['samples']} inputs differ by up to "
        f"{dyn['run_to_run_max_abs']:.2f} ({_pct(dyn['accuracy_run1'])} then "
        f"{_pct(dyn['accuracy_run2'])}). The legacy TorchScript exporter with "
        f"`TrainingMode.TRAINING` writes {ts['batchnorm_training_mode_nodes']} "
        "BatchNormalization nodes with training_mode=1 (PRESERVE on a train-mode model: "
        f"{pre['batchnorm_training_mode_nodes']}), which score {_pct(ts['accuracy_batch1'])} "
        "one request at a time, and exporting changed the exported model's running_mean by "
        f"{ts['exported_model_stats_change']['running_mean']:.3g}. The tool never writes "
        "either: it exports a folded eval-mode copy and refuses Dropout and training-mode "
        "BatchNormalization nodes."
    )


def _md_training_curves(report: dict[str, Any]) -> tuple[str, str]:
    s = report["training_curves"]
    target = _pct(s["target_accuracy"])
    lines = []
    for family, entry in s.items():
        if not isinstance(entry, dict) or "variants" not in entry:
            continue
        (w_name, w), (o_name, o) = entry["variants"].items()
        faster = _compare(w["epochs_to_target"], o["epochs_to_target"], "fewer", "more")
        gap = _compare(w["accuracy_gap"], o["accuracy_gap"], "smaller", "larger")
        loss_gap = _compare(w["loss_gap"], o["loss_gap"], "smaller", "larger")
        lines.append(
            f"`{family}` at lr {entry['lr']}: {w_name} reached {target} validation accuracy in "
            f"{_pm(w['epochs_to_target'])} epochs ({w['epochs_to_target']['reached']}/"
            f"{len(s['seeds'])} seeds), {o_name} in {_pm(o['epochs_to_target'])} "
            f"({o['epochs_to_target']['reached']}/{len(s['seeds'])}); epochs needed with the "
            f"norm: {faster}. Train accuracy {_pm(w['train_accuracy'], 100)} % versus "
            f"{_pm(o['train_accuracy'], 100)} %, test accuracy "
            f"{_pm(w['test_accuracy'], 100)} % versus {_pm(o['test_accuracy'], 100)} %; "
            "train − test accuracy gap "
            f"{_pm(w['accuracy_gap'], 100)} versus {_pm(o['accuracy_gap'], 100)} points and loss "
            f"gap {_pm(w['loss_gap'], digits=3)} versus {_pm(o['loss_gap'], digits=3)}; the gaps "
            f"with the norm: accuracy {gap}, loss {loss_gap}."
        )
    return "8. Training with and without the norms", (
        f"{len(s['seeds'])} seeds × {s['epochs']} epochs per variant, same learning rate, "
        "initial weights and batch order; the variant without norms has a zero bias where a "
        "norm's shift was. The gaps use the test split, because validation picked the kept "
        "epoch.\n\n" + "\n\n".join(f"- {line}" for line in lines)
    )


def _md_folding(report: dict[str, Any]) -> tuple[str, str]:
    s = report["folding"]
    before, after = s["unfolded"], s["folded"]
    gone = {
        op: n - after["op_types"].get(op, 0)
        for op, n in before["op_types"].items()
        if n > after["op_types"].get(op, 0)
    }
    latency = "; ".join(
        f"batch {b}: {v['median_ms']['unfolded']:.3f} → {v['median_ms']['folded']:.3f} ms "
        f"(×{v['unfolded_over_folded']:.2f})"
        for b, v in s["latency"].items()
    )
    return "9. BatchNorm folding", (
        f"Folding removed all {before['batchnorm_nodes']} BatchNormalization nodes; the graph "
        f"went from {before['nodes']} to {after['nodes']} nodes (removed: "
        + ", ".join(f"{op} {n}" for op, n in gone.items())
        + "; the nodes other than BatchNormalization are shape plumbing dropped by the "
        "exporter's optimizer, which export_onnx runs on the folded export only) and from "
        f"{before['params']} to {after['params']} stored parameters. The folded and unfolded "
        f"files agree to {s['folded_vs_unfolded_max_abs']:.1e}. Median latency in onnxruntime, "
        f"one thread, graph optimizations off, {s['repeats']} interleaved repeats: {latency}. "
        "Informational only: onnxruntime's default optimizations fuse Conv+BatchNorm themselves."
    )


SECTIONS = [
    _md_batch_dependence,
    _md_train_vs_eval_accuracy,
    _md_running_stats_drift,
    _md_single_value_batchnorm,
    _md_momentum_and_variance,
    _md_layernorm_invariance,
    _md_export_consequences,
    _md_training_curves,
    _md_folding,
    *SEQUENCE_SECTIONS,
]
