"""A recurrent LayerNorm model exported with a dynamic sequence axis, and what is refused.

Real exports (torch.onnx, dynamo) of small random-init models, checked in onnxruntime at
lengths the parity check did not try. Each export takes ~10-20 s on 2 cores, so only three
tests export (the LayerNorm LSTM with the axis, through the command line; the Python loop the
exporter fixes; the per-step BatchNorm at a fixed length); the other refusals come before
any export.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cli_runner import run_cli_in_process
from safetensors.torch import save_file
from torch import nn

from export.axes import DynamicAxis, DynamicAxisError, all_nodes, parse_dynamic_axis
from export.build import dynamic_axes
from export.publish import publish
from export.to_onnx import export_onnx
from models import REGISTRY
from models.recurrent import LayerNormLSTMCell
from models.sequence import BatchNormSequenceLSTM, SequenceLSTM
from service.repository import CONFIG_FILE, MODEL_FILE, ModelConfig, read_config

FEATURES = 8
EXAMPLE_LENGTH = 8
SPEC = REGISTRY["digits_sequence"]
MAX_LENGTH = SPEC.max_length or 0


def _rows(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, length, FEATURES, generator=torch.Generator().manual_seed(seed))


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class LoopLSTM(nn.Module):
    """The LayerNorm LSTM with a plain Python loop: the exporter unrolls it."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = LayerNormLSTMCell(FEATURES, 16)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        h = rows.new_zeros(rows.shape[0], 16)
        c = torch.zeros_like(h)
        for t in range(rows.shape[1]):
            h, c = self.cell(rows[:, t], (h, c))
        return h


class StepNormRNN(nn.Module):
    """Recurrent BatchNorm as in the literature: one BatchNorm (own statistics) per time step,
    the last one reused past the trained steps."""

    def __init__(self, steps: int = EXAMPLE_LENGTH) -> None:
        super().__init__()
        self.input = nn.Linear(FEATURES, 16)
        self.hidden = nn.Linear(16, 16, bias=False)
        self.norms = nn.ModuleList(nn.BatchNorm1d(16) for _ in range(steps))
        torch.manual_seed(0)
        for norm in self.norms:
            with torch.no_grad():
                norm.running_mean.uniform_(-1, 1)
                norm.running_var.uniform_(0.5, 2)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        h = rows.new_zeros(rows.shape[0], 16)
        for t in range(rows.shape[1]):
            norm = self.norms[min(t, len(self.norms) - 1)]
            h = torch.tanh(norm(self.input(rows[:, t]) + self.hidden(h)))
        return h


class StepStatistics(nn.Module):
    """Per-step statistics in one module told the step, as ``norm(x, t)``."""

    def __init__(self, features: int, steps: int) -> None:
        super().__init__()
        self.register_buffer(
            "running_mean", torch.linspace(-1, 1, steps)[:, None].repeat(1, features)
        )

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        mean: torch.Tensor = self.running_mean[min(t, self.running_mean.shape[0] - 1)]
        return x - mean


class StepIndexedRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input = nn.Linear(FEATURES, 16)
        self.norm = StepStatistics(16, EXAMPLE_LENGTH)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        h = rows.new_zeros(rows.shape[0], 16)
        for t in range(rows.shape[1]):
            h = torch.tanh(self.norm(self.input(rows[:, t]), t) + h)
        return h


# ------------------------------------------------------------------------ exports


@dataclass(frozen=True)
class Exported:
    file: Path
    model: nn.Module
    config: ModelConfig
    stdout: str


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """digits_sequence's model (random weights, from a checkpoint) exported by the command
    line with the axis the registry gives it (export/build.py reads ``input_shape`` (-1, 8)
    the same way)."""
    assert dynamic_axes(SPEC) == [DynamicAxis("image", 1, MAX_LENGTH)]
    work = tmp_path_factory.mktemp("dynamic")
    torch.manual_seed(0)
    model = SequenceLSTM().eval()
    save_file(model.state_dict(), str(work / "sequence.safetensors"))
    result = run_cli_in_process(
        work,
        "onnx", "--model", "models.sequence:SequenceLSTM", "--checkpoint",
        "sequence.safetensors", "--input-shape", f"{EXAMPLE_LENGTH},{FEATURES}",
        "--input-name", "image", "--output-name", "logits", "--dynamic-axis",
        f"image:1:{MAX_LENGTH}", "--name", "sequence", "--repository", "repo",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = read_config(work / "repo" / "sequence" / CONFIG_FILE)
    return Exported(work / "repo" / "sequence" / "1" / MODEL_FILE, model, config, result.stdout)


def test_lstm_exports_with_batch_and_length_dynamic(exported: Exported) -> None:
    (image,) = exported.config.inputs
    assert image.shape == [-1, -1, FEATURES]
    assert image.max_shape == [-1, MAX_LENGTH, FEATURES]
    assert [o.shape for o in exported.config.outputs] == [[-1, 10]]
    # Parity at lengths 1, the example's and 3x it, besides the batches at the example's.
    assert f"lengths 1,{EXAMPLE_LENGTH},{3 * EXAMPLE_LENGTH})" in exported.stdout
    model = onnx.load(str(exported.file))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", "length", FEATURES]
    ops = [n.op_type for n in all_nodes(model.graph)]
    # One step in a Scan body: each of the cell's three LayerNorms is one node, none unrolled.
    assert "Scan" in ops
    assert ops.count("LayerNormalization") == 3 == exported.config.latest.layernorm_nodes


@pytest.mark.parametrize("length", [1, 2, 13, MAX_LENGTH])
def test_file_matches_pytorch_at_lengths_parity_did_not_try(
    exported: Exported, length: int
) -> None:
    path, model = exported.file, exported.model
    rows = _rows(5, length, seed=length)
    with torch.no_grad():
        want = model(rows).numpy()
    (got,) = _session(path).run(None, {"image": rows.numpy()})
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_a_python_loop_over_the_axis_is_refused(tmp_path: Path) -> None:
    """The exporter silently fixes the axis at the example's length; the tool says so."""
    with pytest.raises(DynamicAxisError, match=r"axis 1 of input 'rows' was exported fixed at 8"):
        export_onnx(
            LoopLSTM().eval(),
            _rows(2, EXAMPLE_LENGTH),
            tmp_path / "loop.onnx",
            input_names=["rows"],
            dynamic_axes=[DynamicAxis("rows", 1)],
        )
    assert not (tmp_path / "loop.onnx").exists()


@pytest.mark.parametrize("model", [StepNormRNN, StepIndexedRNN, BatchNormSequenceLSTM])
def test_per_step_statistics_with_a_dynamic_axis_are_refused(
    tmp_path: Path, model: type[nn.Module]
) -> None:
    with pytest.raises(DynamicAxisError, match=r"statistics of its own \(BatchNorm per time"):
        export_onnx(
            model().eval(),
            _rows(2, EXAMPLE_LENGTH),
            tmp_path / "bn.onnx",
            input_names=["rows"],
            dynamic_axes=[DynamicAxis("rows", 1, MAX_LENGTH)],
        )


def test_per_step_batchnorm_exports_for_its_fixed_length(tmp_path: Path) -> None:
    """Without the dynamic axis the per-step model is a fixed-length model: parity holds
    (each step's own statistics) and the repository serves only that length."""
    model = StepNormRNN().eval()
    report = export_onnx(
        model, _rows(2, EXAMPLE_LENGTH), tmp_path / "bn.onnx", input_names=["rows"]
    )
    assert report.inputs[0].shape == [-1, EXAMPLE_LENGTH, FEATURES]
    assert report.parity_lengths == []
    assert report.bn_folded + report.bn_kept == EXAMPLE_LENGTH  # one BatchNorm a step
    config = publish(tmp_path / "repo", "step_bn", report)
    assert config.inputs[0].shape == [-1, EXAMPLE_LENGTH, FEATURES]
    assert config.inputs[0].max_shape is None


# ------------------------------------------------------------------------ refusals before export


def test_dynamic_axis_option_syntax() -> None:
    assert parse_dynamic_axis("image:1:64") == DynamicAxis("image", 1, 64)
    assert parse_dynamic_axis("ids:1") == DynamicAxis("ids", 1, None)
    for bad in ("image", "image:x", "image:0:64", "image:1:0", ":1", "a:1:2:3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_dynamic_axis(bad)


@pytest.mark.parametrize(
    ("axis", "example_length", "message"),
    [
        (DynamicAxis("other", 1), EXAMPLE_LENGTH, "has no input 'other'"),
        (DynamicAxis("rows", 3), EXAMPLE_LENGTH, "has axes 0..2"),
        (DynamicAxis("rows", 1), 1, "the example's size there is 1"),
        (DynamicAxis("rows", 1, 4), EXAMPLE_LENGTH, "is above its maximum 4"),
    ],
)
def test_axes_that_cannot_be_exported_are_refused_first(
    tmp_path: Path, axis: DynamicAxis, example_length: int, message: str
) -> None:
    with pytest.raises(DynamicAxisError, match=message):
        export_onnx(
            LoopLSTM().eval(),
            _rows(2, example_length),
            tmp_path / "m.onnx",
            input_names=["rows"],
            dynamic_axes=[axis],
        )
