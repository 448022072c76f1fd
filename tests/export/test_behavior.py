"""The behaviour report's demonstrations: each measured property, on small models.

The demonstrations are called directly on tiny models (seconds in all); one end-to-end test
runs ``python -m export behavior`` on the session's trained checkpoints and checks that the
report holds every section, its Markdown shows every plot and the PNGs are real PNGs. The
plots' pixels are not tested: their numbers are the JSON's, which the tests do check.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from export import behavior, behavior_training
from export.behavior_plots import write_headline
from export.checkpoint import save_safetensors
from models import REGISTRY
from models.cnn import DigitsCNN
from models.data import load_digits_split
from models.recurrent import RowLSTM
from models.sequence import BatchNormSequenceLSTM
from models.train import train
from models.transformer import RowTransformer
from service.webdata import REPORT_HEADLINE

ROOT = Path(__file__).resolve().parents[2]
SEED = 0
# float32 rounding of a variance or a normalized value computed two ways.
ROUNDING = 1e-5
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = [
    "batch_dependence",
    "train_vs_eval_accuracy",
    "running_stats_drift",
    "single_value_batchnorm",
    "momentum_and_variance",
    "layernorm_invariance",
    "export_consequences",
    "folding",
    "training_curves",
    "length_accuracy",
    "padding",
    "alone_vs_mixed",
]


class TinyBNNet(nn.Module):
    """Conv → BN2d → ReLU → Linear → BN1d → ReLU → Dropout → Linear on [N, 1, 8, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, 16, bias=False),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(16, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@pytest.fixture
def bn_net(randomize_bn: Callable[..., nn.Module]) -> nn.Module:
    torch.manual_seed(SEED)
    # Non-default statistics: the defaults would make eval-mode BatchNorm an identity.
    return randomize_bn(TinyBNNet(), SEED).eval()


def images(count: int, seed: int = SEED) -> torch.Tensor:
    return torch.rand((count, 1, 8, 8), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- 1, 2, 3


def test_batch_dependence_train_mode_spreads_eval_mode_is_exactly_zero(
    bn_net: nn.Module, caller_snapshot: Callable[[nn.Module], Callable[[], None]]
) -> None:
    unchanged = caller_snapshot(bn_net)
    result = behavior.demo_batch_dependence(bn_net, images(80), batch_sizes=(2, 8), companions=6)
    assert all(spread > 0 for spread in result["train"]["logit_range"])
    assert result["eval"]["logit_range"] == [0.0, 0.0]
    assert result["eval"]["prediction_flips"] == [0.0, 0.0]
    unchanged()


def test_train_mode_accuracy_depends_on_batch_size_eval_mode_does_not(
    bn_net: nn.Module, caller_snapshot: Callable[[nn.Module], Callable[[], None]]
) -> None:
    x = images(64)
    with torch.no_grad():
        labels = bn_net(x).argmax(1)  # eval mode's own predictions: it scores exactly 1
    unchanged = caller_snapshot(bn_net)
    result = behavior.demo_train_vs_eval_accuracy(
        bn_net, x, labels, batch_sizes=(1, 2, 8, 64), repeats=2
    )
    assert result["eval"]["mean"] == [1.0] * 4
    assert result["train"]["mean"][0] is None  # batch 1 refused
    assert "Expected more than 1 value per channel" in result["errors"]["train at batch 1"]
    assert result["train_no_dropout"]["mean"][1] < 1.0
    unchanged()


def test_train_vs_eval_accuracy_needs_a_full_largest_batch(bn_net: nn.Module) -> None:
    with pytest.raises(ValueError, match="fewer than the largest batch size 64"):
        behavior.demo_train_vs_eval_accuracy(bn_net, images(10), torch.zeros(10), batch_sizes=(64,))


def test_running_stats_move_under_no_grad_on_a_copy_only(
    bn_net: nn.Module, caller_snapshot: Callable[[nn.Module], Callable[[], None]]
) -> None:
    unchanged = caller_snapshot(bn_net)
    x = images(40)
    result = behavior.demo_running_stats_drift(
        bn_net, images(30, seed=1), x, torch.zeros(40, dtype=torch.long), passes=3, batch_size=8
    )
    for scenario in ("validation_batches", "random_warmup"):
        moved = result[scenario]["stats_change"]
        assert moved["running_mean"] > 0 and moved["running_var"] > 0
        assert moved["num_batches_tracked"] == 3
        assert len(result[scenario]["eval_accuracy"]) == 4
        assert result[scenario]["max_abs_logit_change"][0] == 0.0
        assert result[scenario]["max_abs_logit_change"][-1] > 0
    assert result["caller_unchanged"] is True
    unchanged()


# ---------------------------------------------------------------------------- 4, 5


def test_one_value_per_channel_is_refused_in_train_mode() -> None:
    result = behavior.demo_single_value_batchnorm()
    for case in ("BatchNorm1d [1, C]", "BatchNorm2d [1, C, 1, 1]", "ReferenceBatchNorm [1, C]"):
        assert "Expected more than 1 value per channel" in result[case]["train"], case
        assert result[case]["eval_output_finite"] is True
    assert result["BatchNorm2d [1, C, 2, 2]"]["train"] == "ran"
    assert result["two_values_max_deviation_from_pm1"] < 1e-2


def test_running_var_is_unbiased_normalization_is_biased_and_momentum_conventions() -> None:
    result = behavior.demo_momentum_and_variance()
    assert result["running_var_minus_unbiased"] <= ROUNDING
    assert result["running_var_minus_biased"] > 100 * ROUNDING
    assert result["output_minus_biased_normalization"] <= ROUNDING
    assert result["output_minus_unbiased_normalization"] > 100 * ROUNDING
    assert result["unbiased_over_biased_ratio"]["2"] == pytest.approx(2.0)
    assert result["keras_rule_minus_converted_momentum"] <= ROUNDING
    steps = result["steps_to_within_5_percent"]
    torch_steps = steps[f"PyTorch momentum {behavior.TORCH_MOMENTUM}"]
    keras_steps = steps[f"Keras momentum {behavior.KERAS_MOMENTUM}"]
    assert torch_steps is not None and keras_steps is not None
    assert keras_steps > 5 * torch_steps


# ---------------------------------------------------------------------------- 6


def test_layernorm_models_are_mode_and_batch_independent_exactly(
    bn_net: nn.Module, caller_snapshot: Callable[[nn.Module], Callable[[], None]]
) -> None:
    torch.manual_seed(SEED)
    sequences = torch.rand((30, 8, 8), generator=torch.Generator().manual_seed(SEED))
    models = {
        "transformer": (RowTransformer(), sequences),
        "recurrent": (RowLSTM(), sequences),
        "bn": (bn_net, images(30)),
    }
    checks = [caller_snapshot(m) for m, _ in models.values()]
    result = behavior.demo_layernorm_invariance(models, companions=5)
    for name in ("transformer", "recurrent"):
        assert result[name]["norms"] == ["LayerNorm"]
        assert result[name]["train_minus_eval"] == 0.0
        assert result[name]["companion_spread_train"] == 0.0
        assert result[name]["companion_spread_eval"] == 0.0
        assert result[name]["batch1_minus_full_batch_eval"] <= ROUNDING
    assert result["bn"]["train_minus_eval"] > 0
    assert result["bn"]["companion_spread_train"] > 0
    assert result["bn"]["companion_spread_eval"] == 0.0
    for unchanged in checks:
        unchanged()


# ---------------------------------------------------------------------------- 7, 9


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory,
    randomize_bn: Callable[..., nn.Module],
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> dict[str, Any]:
    """The export demonstration on a train-mode BN net with Dropout (seconds: 4 exports)."""
    torch.manual_seed(SEED)
    model = randomize_bn(TinyBNNet(), SEED).train()
    unchanged = caller_snapshot(model)
    work = tmp_path_factory.mktemp("behavior_export")
    x = images(40)
    result = behavior.demo_export_consequences(
        model, x, torch.zeros(40, dtype=torch.long), work, input_name="image"
    )
    unchanged()
    return {"result": result, "work": work, "x": x}


def test_export_tool_file_is_deterministic_and_within_parity(exported: dict[str, Any]) -> None:
    result = exported["result"]
    tool = result["variants"]["export_onnx"]
    assert tool["run_to_run_max_abs"] == 0.0
    assert tool["dropout_nodes"] == 0 and tool["batchnorm_nodes"] == 0
    assert result["parity_max_abs_error"] <= result["parity_bound"]
    assert tool["vs_torch_eval_max_abs"] <= result["parity_bound"]
    assert result["bn_folded"] == 2
    assert result["caller_unchanged"] is True


def test_naive_train_mode_exports_are_random_and_batch_dependent(
    exported: dict[str, Any],
) -> None:
    variants = exported["result"]["variants"]
    dynamo = variants["dynamo"]
    assert dynamo["dropout_nodes"] >= 1
    assert dynamo["run_to_run_max_abs"] > 0  # two onnxruntime runs, same input, other outputs
    for mode in ("torchscript_preserve", "torchscript_training"):
        assert variants[mode]["batchnorm_training_mode_nodes"] == 2, mode
        # The legacy exporter ran the model in train mode: the exported copy's statistics
        # moved (so the demonstration works on a copy).
        changed = variants[mode]["exported_model_stats_change"]
        assert changed["num_batches_tracked"] >= 1 and changed["running_mean"] > 0, mode


def test_folding_removes_batchnorm_nodes_and_keeps_the_numbers(exported: dict[str, Any]) -> None:
    work, x = exported["work"], exported["x"]
    result = behavior.demo_folding(
        work / "folded.onnx", work / "unfolded.onnx", x, batch_sizes=(1, 8), repeats=3
    )
    assert result["unfolded"]["batchnorm_nodes"] == 2
    assert result["folded"]["batchnorm_nodes"] == 0
    assert result["folded"]["nodes"] < result["unfolded"]["nodes"]
    assert result["folded"]["params"] < result["unfolded"]["params"]
    # Each file is within the parity bound of PyTorch, so within twice of each other.
    assert result["folded_vs_unfolded_max_abs"] <= 2 * exported["result"]["parity_bound"]
    # Latency is informational: present and positive, never compared.
    for size in ("1", "8"):
        assert all(ms > 0 for ms in result["latency"][size]["median_ms"].values())


# ---------------------------------------------------------------------------- 8


def test_without_norms_strips_every_norm_and_keeps_the_weights() -> None:
    torch.manual_seed(SEED)
    cnn = DigitsCNN()
    conv = cnn.features[0][0].weight.detach().clone()
    stripped = behavior_training.without_norms(cnn)
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
    assert not any(isinstance(m, kinds) for m in stripped.modules())
    assert torch.equal(stripped.features[0][0].weight, conv)
    assert stripped.features[0][0].bias is not None
    assert not stripped.features[0][0].bias.any()
    lstm = behavior_training.without_norms(RowLSTM())
    assert not any(isinstance(m, nn.LayerNorm) for m in lstm.modules())
    assert lstm.cell.input_to_gates.bias is not None
    assert lstm(torch.rand(3, 8, 8)).shape == (3, 10)


def test_variants_without_norms_train_and_give_curves() -> None:
    families = {
        "digits_recurrent": (REGISTRY["digits_recurrent"], "with LayerNorm", "without LayerNorm")
    }
    epochs = 2
    result = behavior_training.demo_training_curves(
        families, load_digits_split(), seeds=(0,), epochs=epochs, target=0.5
    )
    variants = result["digits_recurrent"]["variants"]
    assert set(variants) == {"with LayerNorm", "without LayerNorm"}
    for variant in variants.values():
        accuracy = variant["validation_accuracy"]["mean"]
        assert len(accuracy) == epochs and len(variant["validation_loss"]["mean"]) == epochs
        assert accuracy[-1] > 0.2  # learned something: chance is 0.1
        assert variant["epochs_to_target"]["reached"] in (0, 1)
        assert variant["accuracy_gap"]["mean"] is not None


# ---------------------------------------------------------------------------- end to end


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC, path
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def _numbers(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int | float):
        return 1
    if isinstance(value, dict):
        return sum(_numbers(v) for v in value.values())
    if isinstance(value, list):
        return sum(_numbers(v) for v in value)
    return 0


@pytest.mark.slow
def test_command_writes_the_whole_report(
    built_repository: tuple[Path, Path, str], tmp_path: Path
) -> None:
    # The session's checkpoints, and the BatchNorm twin of digits_sequence that the report
    # trains for itself (a minute with its recipe): one epoch is enough to check the command.
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(built_repository[1], checkpoints)
    twin = checkpoints / f"{behavior_training.SEQUENCE_BATCHNORM}.safetensors"
    if not twin.exists():
        torch.manual_seed(0)
        trained = train(REGISTRY["digits_sequence"], model=BatchNormSequenceLSTM(), epochs=1,
                        progress=None)  # fmt: skip
        save_safetensors(trained.model, twin, {"model": behavior_training.SEQUENCE_BATCHNORM})
    docs_plot = ROOT / "docs" / "behavior.png"
    before = docs_plot.stat().st_mtime_ns if docs_plot.exists() else None
    out = tmp_path / "report"
    completed = subprocess.run(
        [sys.executable, "-m", "export", "behavior", "--out", str(out), "--checkpoints",
         str(checkpoints), "--seeds", "1", "--epochs", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "no checkpoint" not in completed.stderr  # the checkpoints above were used
    report = json.loads((out / "report.json").read_text())
    for section in SECTIONS:
        assert _numbers(report[section]) > 0, section
    markdown = (out / "report.md").read_text()
    plots = report["meta"]["plots"]
    assert len(plots) >= 8
    for name in plots.values():
        assert f"]({name})" in markdown, name
        _png_size(out / name)
    after = docs_plot.stat().st_mtime_ns if docs_plot.exists() else None
    assert after == before  # the tracked plot is rewritten only with --docs-plot
    # The headline is written beside the other plots anyway: the web page serves it there.
    assert _png_size(out / REPORT_HEADLINE) == (900, 500)
    headline = tmp_path / "headline.png"
    write_headline(report, headline)
    assert _png_size(headline) == (900, 500)
    assert headline.stat().st_size <= 80_000


@pytest.mark.parametrize(
    ("flags", "expected"),
    [([], None), (["--docs-plot"], ROOT / "docs" / "behavior.png")],
    ids=["default", "docs-plot"],
)
def test_tracked_docs_plot_is_written_only_when_asked(
    flags: list[str], expected: Path | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented command must leave ``git status`` clean: docs/behavior.png is tracked."""
    import importlib

    cli = importlib.import_module("export.__main__")
    calls: list[Path | None] = []
    monkeypatch.setattr(
        cli, "run_behavior", lambda *_a, docs_plot, **_k: calls.append(docs_plot) or {}
    )
    assert cli.main(["behavior", *flags]) == 0
    assert [None if p is None else Path(p).resolve() for p in calls] == [expected]
