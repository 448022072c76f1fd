"""Demonstrations 10-12 of the behaviour report (export/behavior_sequence.py): their figures
and their report sections, each drawn and written from the report's JSON alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from export.behavior_plots import COLORS, _log_bars
from export.behavior_sequence import BATCHNORM, LAYERNORM
from service.webdata import LENGTH_PLOT

Report = dict[str, Any]
POLICY_STYLE = {
    "last": ("the last step's statistics (Cooijmans et al.)", COLORS["train"], "s-"),
    "pooled": ("all steps' statistics pooled", COLORS["grey"], "d--"),
    "batch": ("the batch's own statistics", "#e08214", "^:"),
}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


# ---------------------------------------------------------------------------- figures


def _length_accuracy(plt: Any, report: Report) -> Any:
    s = report["length_accuracy"]
    fig, ax = plt.subplots(figsize=(10, 6), layout="constrained")
    low, high = s["train_lengths"]
    ax.axvspan(low - 0.5, high + 0.5, color=COLORS["eval"], alpha=0.08, label="training lengths")
    lengths = s["lengths"]
    ax.plot(
        lengths,
        [100 * a for a in s[LAYERNORM]],
        "o-",
        color=COLORS["other"],
        label=f"{LAYERNORM} in the cell",
        linewidth=2,
    )
    for policy, accuracy in s[BATCHNORM].items():
        label, color, style = POLICY_STYLE[policy]
        ax.plot(
            lengths,
            [100 * a for a in accuracy],
            style,
            color=color,
            markersize=4,
            label=f"per-step {BATCHNORM}; past step {s['batchnorm_steps']}: {label}",
        )
    alone = s["batch_alone"]
    ax.plot(
        alone["lengths"],
        [100 * a for a in alone["accuracy"]],
        "x",
        color="#e08214",
        markersize=10,
        mew=2,
        label="per-step BatchNorm; the batch's own statistics, one sequence at a time",
    )
    ax.axvline(s["batchnorm_steps"] + 0.5, color="black", linestyle=":", linewidth=1)
    ax.set_xticks(lengths[::2])
    ax.set_ylim(0, 102)
    ax.set_xlabel("rows per digit (the 8x8 image resampled along its rows; 8 = the image)")
    ax.set_ylabel(f"eval-mode accuracy on {s['samples']} held-out digits (%)")
    # Below the axes: inside, it would hide the one-at-a-time crosses near 10 %.
    fig.legend(fontsize=8, loc="outside lower center", ncol=2)
    ax.grid(alpha=0.3)
    fig.suptitle(
        "10. Accuracy by sequence length: per-step BatchNorm has no statistics past "
        "the longest training sequence"
    )
    return fig


def _padding(plt: Any, report: Report) -> Any:
    s = report["padding"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    steps = s["steps"]
    xs = list(range(1, len(steps["real_rows"]) + 1))
    bars = left.twinx()
    bars.bar(xs, steps["real_rows"], color=COLORS["grey"], alpha=0.25, label="real rows")
    bars.set_ylabel(f"real (unpadded) rows of {s['batch_size']}")
    left.set_zorder(bars.get_zorder() + 1)
    left.patch.set_visible(False)
    left.plot(
        xs,
        steps["mean_shift_std"],
        "o-",
        color=COLORS["train"],
        label="batch mean shift (std of the real rows)",
    )
    left.plot(
        xs,
        steps["variance_ratio"],
        "s-",
        color=COLORS["other"],
        label="batch variance, padded / real",
    )
    left.set_xlabel("time step")
    left.set_title("Padded rows counted in the per-step batch statistics")
    left.legend(fontsize=8, loc="upper left")
    left.grid(alpha=0.3)
    drift = s["drift"]
    labels = {
        "untouched": ("trained model", "black", "o-"),
        "equal_lengths": ("after equal-length batches", COLORS["eval"], "^-"),
        "padding_masked": ("after padded batches, padding masked", COLORS["other"], "s-"),
        "padding_counted": ("after padded batches, padding counted", COLORS["train"], "d-"),
    }
    for key, (label, color, style) in labels.items():
        right.plot(
            drift["lengths"],
            [100 * a for a in drift[key]],
            style,
            color=color,
            label=label,
            markersize=4,
        )
    right.set_xlabel("rows per digit")
    right.set_ylabel("eval-mode test accuracy (%)")
    right.set_title(f"{drift['passes']} train-mode passes (no gradient) move running statistics")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle(
        "11. Per-step BatchNorm and padding (LayerNorm: padded = alone, "
        f"{max(s['layernorm_padded_vs_alone'].values()):.0e})"
    )
    return fig


def _alone_vs_mixed(plt: Any, report: Report) -> Any:
    s = report["alone_vs_mixed"]
    names = [n for n in s if isinstance(s[n], dict)]
    fig, ax = plt.subplots(figsize=(10, 4.5), layout="constrained")
    labels = [
        n.replace(", ", ",\n") + f"\nclass changed in {_pct(s[n]['prediction_changed'])}"
        for n in names
    ]
    _log_bars(
        ax,
        labels,
        {"max |Δ logit|": [s[n]["max_abs_difference"] for n in names]},
        [COLORS["other"]],
    )
    ax.set_ylabel("max |Δ logit| vs alone")
    ax.set_title(
        f"Digit 0 at {s['probe_length']} rows alone vs first in "
        f"{s['companion_batches']} padded batches of {s['batch_size']} mixed lengths"
    )
    fig.suptitle("12. One sequence alone vs in a batch of mixed lengths")
    return fig


# The length figure's file is the one the web page serves (service/webdata.py).
SEQUENCE_FIGURES: dict[str, Callable[[Any, Report], Any]] = {
    LENGTH_PLOT.removesuffix(".png"): _length_accuracy,
    "padding": _padding,
    "alone_vs_mixed": _alone_vs_mixed,
}


# ---------------------------------------------------------------------------- Markdown


def _md_length_accuracy(report: Report) -> tuple[str, str]:
    s = report["length_accuracy"]
    low, high = s["train_lengths"]
    summary = s["summary"]
    ln, bn = summary[LAYERNORM], {p: summary[f"{BATCHNORM} {p}"] for p in s[BATCHNORM]}
    at = {p: dict(zip(s["lengths"], v, strict=True)) for p, v in s[BATCHNORM].items()}
    ln_at = dict(zip(s["lengths"], s[LAYERNORM], strict=True))
    longest = s["lengths"][-1]
    policies = "; ".join(
        f"{POLICY_STYLE[p][0]}: {_pct(bn[p]['above'])} on average, {_pct(at[p][longest])} at "
        f"{longest}"
        for p in s[BATCHNORM]
    )
    alone = ", ".join(
        f"{_pct(a)} at {n}"
        for n, a in zip(s["batch_alone"]["lengths"], s["batch_alone"]["accuracy"], strict=True)
    )
    return "10. Accuracy by sequence length, beyond the lengths seen in training", (
        f"Both LSTMs were trained the same way (`digits_sequence`'s recipe, seed and hidden "
        f"size; every batch one length drawn from {low}..{high} rows) and read the "
        f"{s['samples']} held-out digits resampled to {s['lengths'][0]}..{longest} rows. "
        f"Inside the training lengths LayerNorm scores {_pct(ln['inside'])} on average and "
        f"per-step BatchNorm {_pct(bn['last']['inside'])} (at 8 rows {_pct(ln_at[8])} and "
        f"{_pct(at['last'][8])}). Past {high} rows LayerNorm runs the same computation at "
        f"every step and scores {_pct(ln['above'])} on average ({_pct(ln_at[longest])} at "
        f"{longest}). BatchNorm has running statistics for steps 1..{s['batchnorm_steps']} "
        f"only, so each fallback is a choice, measured: {policies}. The batch's own statistics "
        f"also make the answer depend on the batch: one sequence at a time they score {alone} "
        "(a batch of one has variance 0). Below the training lengths both lose the rows the "
        f"resampling skips ({_pct(ln['below'])} and {_pct(bn['last']['below'])}): that is the "
        "data, not the norm."
    )


def _md_padding(report: Report) -> tuple[str, str]:
    s = report["padding"]
    steps, train, drift = s["steps"], s["batchnorm_train"], s["drift"]
    last = len(steps["real_rows"]) - 1
    worst = max(range(len(steps["variance_ratio"])), key=lambda t: steps["mean_shift_std"][t])
    low, high = drift["lengths"][0], drift["lengths"][-1]
    rows = "; ".join(
        f"{k.replace('_', ' ')} {_pct(sum(drift[k]) / len(drift[k]))} on average, lowest "
        f"{_pct(min(drift[k]))}"
        for k in ("untouched", "equal_lengths", "padding_masked", "padding_counted")
    )
    ln = s["layernorm_padded_vs_alone"]
    return "11. Padding: what padded steps do to per-step BatchNorm, and nothing to LayerNorm", (
        f"A batch of {s['batch_size']} held-out digits at random lengths {min(s['lengths'])}.."
        f"{max(s['lengths'])}, zero-padded to {len(steps['real_rows'])} steps: at step "
        f"{last + 1} only {steps['real_rows'][last]} rows are real. Counted in BatchNorm's "
        f"train-mode statistics, the padded rows shift the batch mean of the input "
        f"contribution by up to {steps['mean_shift_std'][worst]:.2f} standard deviations (step "
        f"{worst + 1}) and scale its variance by {steps['variance_ratio'][worst]:.2f}. Train-"
        f"mode outputs with the padding counted versus masked out differ by up to "
        f"{train['max_abs_logit_difference']:.2f} (class changed for "
        f"{_pct(train['predictions_changed'])} of the batch; accuracy "
        f"{_pct(train['accuracy_padding_counted'])} versus "
        f"{_pct(train['accuracy_padding_masked'])}). Masking fixes the mean but not the sample "
        f"size: the last steps' statistics come from a handful of rows. The running statistics "
        f"keep what training-mode passes saw: after {drift['passes']} passes without gradient "
        f"over padded validation batches, eval accuracy at {low}..{high} rows reads: {rows}. "
        f"LayerNorm normalizes each row on its own: a padded batch (lengths passed) gives each "
        f"sequence its answer alone to {ln['eval']:.1e} in eval mode and {ln['train']:.1e} in "
        "train mode (rounding)."
    )


def _md_alone_vs_mixed(report: Report) -> tuple[str, str]:
    s = report["alone_vs_mixed"]
    names = [n for n in s if isinstance(s[n], dict)]
    lines = "; ".join(
        f"{n} (vs {s[n]['compared_with']}): {s[n]['max_abs_difference']:.1e}, class changed in "
        f"{_pct(s[n]['prediction_changed'])}"
        for n in names
    )
    return "12. One sequence alone versus in a batch of mixed lengths", (
        f"Test digit 0 at {s['probe_length']} rows, alone and first in "
        f"{s['companion_batches']} zero-padded batches of {s['batch_size']} digits at random "
        f"training lengths (lengths passed, so every model masks the padded steps). Max |Δ "
        f"logit| against the answer alone: {lines}. In train mode per-step BatchNorm alone is a "
        "batch of one: its variance is 0 and every input gets the same answer (two different "
        f"digits differ by {s['batchnorm_train_alone_any_input']:.1e}), so it is compared with "
        "eval mode, the answer a server gives. Masking makes eval-mode BatchNorm independent of "
        "the batch too; in training it cannot be."
    )


SEQUENCE_SECTIONS = [_md_length_accuracy, _md_padding, _md_alone_vs_mixed]
