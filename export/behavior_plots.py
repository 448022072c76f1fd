"""The behaviour report's figures, drawn from its JSON (``export.behavior_report``).

Every figure reads only the report dict, so it shows exactly the numbers the JSON holds.
Each has a title and axis labels that say what was measured on what, so it reads on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

DPI = 100
# Values below this are drawn at it on log axes and labelled "0": an exact zero is the point.
LOG_FLOOR = 1e-9
COLORS = {"eval": "#1b7837", "train": "#c51b7d", "other": "#2166ac", "grey": "#777777"}

Report = dict[str, Any]
EXPORT_LABELS = {
    "export_onnx": "export_onnx\n(folded, eval)",
    "dynamo": "dynamo,\nmodel in train mode",
    "torchscript_preserve": "TorchScript\nPRESERVE",
    "torchscript_training": "TorchScript\nTRAINING",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, identical output everywhere
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.titlesize": 11})
    return plt


def write_plots(
    report: Report,
    out_dir: Path,
    figures: Mapping[str, Callable[[Any, Report], Any]] | None = None,
) -> dict[str, str]:
    """Draw every figure (``FIGURES`` unless given) into ``out_dir``; returns section name →
    file name."""
    plt = _pyplot()
    files = {}
    for name, draw in (FIGURES if figures is None else figures).items():
        fig = draw(plt, report)
        fig.savefig(out_dir / f"{name}.png", dpi=DPI)
        plt.close(fig)
        files[name] = f"{name}.png"
    return files


def write_headline(report: Report, path: Path) -> None:
    """The small summary figure for the README: 900x500 px."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 5), layout="constrained")
    _accuracy_panel(left, report["train_vs_eval_accuracy"], with_no_dropout=False)
    _spread_panel(right, report["batch_dependence"])
    fig.suptitle(
        "digits_cnn: BatchNorm in train mode depends on the batch, in eval mode it does not"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


# ---------------------------------------------------------------------------- panels


def _accuracy_panel(ax: Any, section: Report, *, with_no_dropout: bool) -> None:
    sizes = section["batch_sizes"]
    lines = {
        "eval mode": ("eval", COLORS["eval"], "o-"),
        "train mode, random batches": ("train", COLORS["train"], "s-"),
        "train mode, one-class batches": ("train_one_class", COLORS["other"], "^-"),
    }
    if with_no_dropout:
        lines["train mode, dropout off"] = ("train_no_dropout", COLORS["grey"], "d--")
    for label, (key, color, style) in lines.items():
        points = [
            (s, m, e)
            for s, m, e in zip(sizes, section[key]["mean"], section[key]["std"], strict=True)
            if m is not None
        ]
        xs, means, stds = zip(*points, strict=True)
        ax.errorbar(
            xs,
            [100 * m for m in means],
            yerr=[100 * e for e in stds],
            fmt=style,
            color=color,
            label=label,
            capsize=3,
        )
    failed = [s for s, m in zip(sizes, section["train"]["mean"], strict=True) if m is None]
    for size in failed:
        ax.plot([size], [1], "x", color=COLORS["train"], markersize=10, mew=2)
        ax.annotate(
            "train mode\nraises\nValueError",
            (size, 1),
            (size * 1.05, 27),
            fontsize=8,
            arrowprops={"arrowstyle": "->", "color": COLORS["train"]},
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_ylim(0, 102)
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"accuracy on {section['samples']} held-out digits (%)")
    ax.set_title("Accuracy in train vs eval mode")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def _spread_panel(ax: Any, section: Report) -> None:
    sizes = [str(s) for s in section["batch_sizes"]]
    positions = range(len(sizes))
    width = 0.38
    for offset, mode in ((-width / 2, "train"), (width / 2, "eval")):
        values = section[mode]["logit_range"]
        bars = ax.bar(
            [p + offset for p in positions], values, width, color=COLORS[mode], label=f"{mode} mode"
        )
        for bar, value in zip(bars, values, strict=True):
            text = "0 exactly" if value == 0 else f"{value:.2f}"
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, value),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(list(positions), sizes)
    ax.set_xlabel("batch size (1 fixed digit + random companions)")
    ax.set_ylabel("max logit range across companion batches")
    ax.set_title(f"One digit's output over {section['companion_batches']} batches of companions")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")


def _log_bars(
    ax: Any, labels: list[str], series: dict[str, list[float]], colors: list[str]
) -> None:
    width = 0.8 / len(series)
    for i, ((name, values), color) in enumerate(zip(series.items(), colors, strict=True)):
        xs = [p + (i - (len(series) - 1) / 2) * width for p in range(len(labels))]
        bars = ax.bar(xs, [max(v, LOG_FLOOR) for v in values], width, color=color, label=name)
        for bar, value in zip(bars, values, strict=True):
            text = "0" if value == 0 else f"{value:.0e}"
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, max(value, LOG_FLOOR)),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")


# ---------------------------------------------------------------------------- figures


def _batch_dependence(plt: Any, report: Report) -> Any:
    section = report["batch_dependence"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    for i in range(len(section["batch_sizes"])):
        for offset, mode in ((-0.15, "train"), (0.15, "eval")):
            values = section[mode]["probability"][i]
            xs = [i + offset] * len(values)
            label = f"{mode} mode" if i == 0 else None
            left.scatter(xs, values, s=14, alpha=0.6, color=COLORS[mode], label=label)
    left.set_xticks(range(len(section["batch_sizes"])), [str(s) for s in section["batch_sizes"]])
    left.set_xlabel("batch size")
    left.set_ylabel("probability of its eval-mode class")
    left.set_title("The same digit, each dot another batch of companions")
    left.annotate(
        "eval mode: every dot\nin the same place",
        (0.15, 1),
        (0.35, 0.7),
        fontsize=8,
        arrowprops={"arrowstyle": "->", "color": COLORS["eval"]},
    )
    left.set_ylim(-0.02, 1.02)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    _spread_panel(right, section)
    fig.suptitle("1. digits_cnn: a sample's output depends on its batch only in train mode")
    return fig


def _accuracy(plt: Any, report: Report) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    _accuracy_panel(ax, report["train_vs_eval_accuracy"], with_no_dropout=True)
    fig.suptitle("2. digits_cnn accuracy by batch size: train mode needs big, mixed batches")
    return fig


def _drift(plt: Any, report: Report) -> Any:
    section = report["running_stats_drift"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    labels = {
        "validation_batches": "validation batches without model.eval()",
        "random_warmup": "warm-up on random tensors",
    }
    for (key, label), color in zip(labels.items(), (COLORS["other"], COLORS["train"]), strict=True):
        left.plot(
            section["passes"],
            [100 * a for a in section[key]["eval_accuracy"]],
            "o-",
            color=color,
            label=label,
            markersize=3,
        )
        right.plot(
            section["passes"],
            section[key]["max_abs_logit_change"],
            "o-",
            color=color,
            label=label,
            markersize=3,
        )
    left.set_ylabel("eval-mode test accuracy afterwards (%)")
    left.set_ylim(0, 102)
    right.set_ylabel("max |Δ logit| vs the untouched model")
    for ax in (left, right):
        ax.set_xlabel(f"train-mode forward passes under no_grad (batch {section['batch_size']})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    left.set_title("No gradient, no optimizer step: accuracy still moves")
    right.set_title("How far the eval-mode outputs moved")
    fig.suptitle("3. digits_cnn: every train-mode forward pass rewrites the running statistics")
    return fig


def _momentum(plt: Any, report: Report) -> Any:
    section = report["momentum_and_variance"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    colors = (COLORS["train"], COLORS["other"], COLORS["grey"])
    for (name, values), color in zip(section["running_mean"].items(), colors, strict=True):
        steps = section["steps_to_within_5_percent"][name]
        left.plot(values, color=color, label=f"{name}: within 5 % after {steps} steps")
    left.axhline(section["target_mean"], color="black", linestyle=":", label="true mean")
    left.set_xlabel(f"training steps (batches of {section['batch']})")
    left.set_ylabel("running_mean")
    left.set_title("Running mean following a stream, from its initial 0")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    ratios = section["unbiased_over_biased_ratio"]
    right.bar(list(ratios), list(ratios.values()), color=COLORS["other"])
    for i, value in enumerate(ratios.values()):
        right.annotate(f"{value:.4f}", (i, value), ha="center", va="bottom", fontsize=8)
    right.set_xlabel("values per channel in the batch (n)")
    right.set_ylabel("unbiased / biased variance")
    right.set_title("running_var stores the unbiased variance: biased × n/(n−1)")
    right.grid(alpha=0.3, axis="y")
    fig.suptitle("5. BatchNorm bookkeeping: momentum conventions and the variance estimator")
    return fig


def _layernorm(plt: Any, report: Report) -> Any:
    section = report["layernorm_invariance"]
    names = list(section)
    fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
    series = {
        "train − eval mode (dropout off)": [section[n]["train_minus_eval"] for n in names],
        "companion spread, train mode": [section[n]["companion_spread_train"] for n in names],
        "companion spread, eval mode": [section[n]["companion_spread_eval"] for n in names],
        "batch 1 − full batch, eval (rounding)": [
            section[n]["batch1_minus_full_batch_eval"] for n in names
        ],
    }
    colors = [COLORS["train"], COLORS["other"], COLORS["eval"], COLORS["grey"]]
    labels = [f"{n}\n({', '.join(section[n]['norms'])})" for n in names]
    _log_bars(ax, labels, series, colors)
    ax.set_ylabel("max |Δ logit| (bars at the floor are exactly 0)")
    ax.set_title("6. LayerNorm models: identical in train and eval mode and across companions")
    return fig


def _export(plt: Any, report: Report) -> Any:
    section = report["export_consequences"]
    names = list(section["variants"])
    variants = [section["variants"][n] for n in names]
    labels = [EXPORT_LABELS.get(n, n) for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    width = 0.27
    for i, (key, label) in enumerate(
        (
            ("accuracy_run1", "full batch, run 1"),
            ("accuracy_run2", "full batch, run 2"),
            ("accuracy_batch1", "one request at a time"),
        )
    ):
        xs = [p + (i - 1) * width for p in range(len(names))]
        bars = left.bar(xs, [100 * v[key] for v in variants], width, label=label)
        for bar in bars:
            height = bar.get_height()
            left.annotate(
                f"{height:.0f}",
                (bar.get_x() + width / 2, height),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    left.set_xticks(range(len(names)), labels, fontsize=8)
    left.set_ylabel(f"onnxruntime accuracy on {section['samples']} test digits (%)")
    left.set_ylim(0, 105)
    left.set_title("Served accuracy of each ONNX file")
    left.legend(fontsize=8, loc="lower left")
    left.grid(alpha=0.3, axis="y")
    series = {
        "run 1 vs run 2": [v["run_to_run_max_abs"] for v in variants],
        "vs PyTorch eval": [v["vs_torch_eval_max_abs"] for v in variants],
        "batch 1 vs full batch": [v["batch1_vs_full_batch_max_abs"] for v in variants],
    }
    _log_bars(right, labels, series, [COLORS["train"], COLORS["other"], COLORS["grey"]])
    right.set_ylabel("max |Δ logit|")
    right.set_title("Determinism and fidelity of each file")
    fig.suptitle("7. digits_cnn exported four ways: only the eval-mode export is the model")
    return fig


def _training(plt: Any, report: Report) -> Any:
    section = report["training_curves"]
    families = [k for k, v in section.items() if isinstance(v, dict) and "variants" in v]
    fig, axes = plt.subplots(
        len(families), 2, figsize=(11, 3.6 * len(families)), layout="constrained", squeeze=False
    )
    for row, family in zip(axes, families, strict=True):
        for (label, variant), color in zip(
            section[family]["variants"].items(), (COLORS["eval"], COLORS["train"]), strict=True
        ):
            epochs = range(1, len(variant["validation_accuracy"]["mean"]) + 1)
            for ax, key, scale in (
                (row[0], "validation_accuracy", 100),
                (row[1], "validation_loss", 1),
            ):
                mean = [scale * m for m in variant[key]["mean"]]
                std = [scale * s for s in variant[key]["std"]]
                ax.plot(epochs, mean, "o-", color=color, label=label, markersize=3)
                ax.fill_between(
                    epochs,
                    [m - s for m, s in zip(mean, std, strict=True)],
                    [m + s for m, s in zip(mean, std, strict=True)],
                    color=color,
                    alpha=0.2,
                )
        row[0].axhline(
            100 * section["target_accuracy"], color="black", linestyle=":", label="target"
        )
        row[0].set_ylabel("validation accuracy (%)")
        row[1].set_ylabel("validation loss")
        row[1].set_yscale("log")
        lr = section[family]["lr"]
        for ax in row:
            ax.set_xlabel("epoch")
            ax.set_title(f"{family}, lr {lr}, mean ± std over {len(section['seeds'])} seeds")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle("8. Training with and without the normalization layers (same lr, init, order)")
    return fig


def _folding(plt: Any, report: Report) -> Any:
    section = report["folding"]
    fig, (graph, params, latency) = plt.subplots(1, 3, figsize=(12, 4.2), layout="constrained")
    kinds = ("unfolded", "folded")
    colors = [COLORS["grey"], COLORS["eval"]]
    graph.bar([0, 1], [section[k]["nodes"] for k in kinds], 0.6, color=colors)
    graph.bar(
        [0, 1],
        [section[k]["batchnorm_nodes"] for k in kinds],
        0.6,
        color=COLORS["train"],
        label="BatchNormalization nodes",
    )
    for i, kind in enumerate(kinds):
        total, bn = section[kind]["nodes"], section[kind]["batchnorm_nodes"]
        graph.annotate(f"{total} ({bn} BN)", (i, total), ha="center", va="bottom", fontsize=8)
    graph.set_xticks([0, 1], kinds)
    graph.set_ylabel("ONNX nodes")
    graph.set_title("Graph nodes")
    graph.legend(fontsize=8)
    params.bar([0, 1], [section[k]["params"] for k in kinds], 0.6, color=colors)
    for i, kind in enumerate(kinds):
        value = section[kind]["params"]
        params.annotate(f"{value:,}", (i, value), ha="center", va="bottom", fontsize=8)
    params.set_xticks([0, 1], kinds)
    params.set_ylabel("initializer elements")
    params.set_title("Parameters stored in the file")
    sizes = list(section["latency"])
    # Per sample, so that batch 1 and batch 64 share one linear axis.
    for i, (kind, color) in enumerate(zip(kinds, colors, strict=True)):
        values = [1e3 * section["latency"][s]["median_ms"][kind] / int(s) for s in sizes]
        xs = [p + (i - 0.5) * 0.38 for p in range(len(sizes))]
        latency.bar(xs, values, 0.38, color=color, label=kind)
    for p, size in enumerate(sizes):
        ratio = section["latency"][size]["unfolded_over_folded"]
        top = 1e3 * section["latency"][size]["median_ms"]["unfolded"] / int(size)
        text = f"unfolded/folded ×{ratio:.2f}"
        latency.annotate(text, (p, top), ha="center", va="bottom", fontsize=8)
    latency.set_xticks(range(len(sizes)), [f"batch {s}" for s in sizes])
    latency.set_ylabel("median µs per sample (1 thread, optimizations off)")
    latency.set_title(f"onnxruntime latency, {section['repeats']} interleaved repeats")
    latency.legend(fontsize=8)
    fig.suptitle("9. digits_cnn: BatchNorm folded into the conv/linear weights")
    return fig


FIGURES: dict[str, Callable[[Any, Report], Any]] = {
    "batch_dependence": _batch_dependence,
    "train_vs_eval_accuracy": _accuracy,
    "running_stats_drift": _drift,
    "momentum_and_variance": _momentum,
    "layernorm_invariance": _layernorm,
    "export_consequences": _export,
    "training_curves": _training,
    "folding": _folding,
}
