"""export_onnx end to end: the written file, its graph, its numbers, and each refusal.

Each export takes seconds, so the exported models are module-scoped fixtures that several
tests read; the refusals that happen before exporting cost nothing.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from export import (
    BatchDependentError,
    ExportError,
    ExportReport,
    OpsetError,
    ParityError,
    export_onnx,
)
from export.parity import PARITY_FLOOR, ParityRule, default_batches

# onnxruntime vs PyTorch eval: max|Δ| <= RTOL * max(1, max|torch|), the tool's default bound.
RTOL = 1e-5
DEFAULT_OPSET = 18
RUN_BATCHES = [1, 3, 50]
# A parity rule no folded float32 graph meets: any rounding difference exceeds it.
IMPOSSIBLE = ParityRule(factor=0.0, floor=1e-30, fallback_rtol=1e-30)
LABELS = ["zero", "one", "two", "three"]
SEED = 0


def bound(reference: np.ndarray, rtol: float = RTOL) -> float:
    return rtol * max(1.0, float(np.abs(reference).max()))


def op_types(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def torch_eval(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return copy.deepcopy(model).eval()(x).double().numpy()


class ConvMLP(nn.Module):
    """Conv → BN → ReLU → Linear → BN1d → Dropout → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 6 * 6, 16)
        self.bn1d = nn.BatchNorm1d(16)
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, len(LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(self.dropout(self.bn1d(self.fc1(h))))


class PreNormBlock(nn.Module):
    """A pre-norm MLP block on [N, 8, 16]; ln1 is called twice, so 3 LayerNorm calls."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.ln2 = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.fc2(F.gelu(self.fc1(self.ln1(x))))
        h = h + self.ln1(h)
        return self.head(self.ln2(h)).sum(1)


LAYERNORM_CALLS = 3


def randomize_layernorms(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                n = module.weight.shape
                module.weight.copy_(torch.empty(n).uniform_(-2, 2, generator=generator))
                module.bias.copy_(torch.empty(n).uniform_(-1, 1, generator=generator))
    return model


@dataclass
class Exported:
    model: nn.Module
    report: ExportReport
    path: Path
    unfolded: Path
    assert_unchanged: Callable[[], None]


@pytest.fixture(scope="module")
def conv_mlp(
    tmp_path_factory: pytest.TempPathFactory,
    randomize_bn: Callable[..., nn.Module],
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> Exported:
    torch.manual_seed(SEED)
    model = randomize_bn(ConvMLP(), SEED).train()
    assert_unchanged = caller_snapshot(model)
    out_dir = tmp_path_factory.mktemp("conv_mlp")
    path, unfolded = out_dir / "model.onnx", out_dir / "unfolded.onnx"
    report = export_onnx(
        model,
        torch.randn(4, 3, 6, 6),
        path,
        input_names=["image"],
        output_names=["logits"],
        labels=LABELS,
        source="tests",
        metadata={"normserve.extra": "kept"},
        unfolded_path=unfolded,
    )
    return Exported(model, report, path, unfolded, assert_unchanged)


def test_batchnorms_folded_and_no_training_nodes(conv_mlp: Exported) -> None:
    report = conv_mlp.report
    assert (report.bn_folded, report.bn_kept) == (2, 0)
    assert report.kept_reasons == {}
    ops = op_types(conv_mlp.path)
    assert ops.count("BatchNormalization") == 0 == report.batchnorm_nodes
    assert ops.count("Dropout") == 0 == report.dropout_nodes
    assert report.nodes_after == len(ops)
    assert "Conv" in ops and ("Gemm" in ops or "MatMul" in ops)


def test_one_self_contained_file_that_passes_the_full_checker(conv_mlp: Exported) -> None:
    assert sorted(p.name for p in conv_mlp.path.parent.iterdir()) == [
        "model.onnx",
        "unfolded.onnx",
    ]
    proto = onnx.load(str(conv_mlp.path), load_external_data=False)
    assert proto.graph.initializer
    for tensor in proto.graph.initializer:
        assert tensor.data_location == onnx.TensorProto.DEFAULT, tensor.name
        assert not tensor.external_data, tensor.name
    onnx.checker.check_model(str(conv_mlp.path), full_check=True)


def test_opset_is_the_default_and_reported(conv_mlp: Exported) -> None:
    proto = onnx.load(str(conv_mlp.path))
    written = {o.domain: o.version for o in proto.opset_import}[""]
    assert written == conv_mlp.report.opset == DEFAULT_OPSET


def test_batch_axis_is_dynamic_in_the_graph(conv_mlp: Exported) -> None:
    graph = onnx.load(str(conv_mlp.path)).graph
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == ["logits"]
    for value in (*graph.input, *graph.output):
        batch_dim = value.type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param and not batch_dim.HasField("dim_value"), value.name
    assert [(i.name, i.shape) for i in conv_mlp.report.inputs] == [("image", [-1, 3, 6, 6])]
    assert [(o.name, o.shape) for o in conv_mlp.report.outputs] == [("logits", [-1, 4])]


@pytest.mark.parametrize("batch", RUN_BATCHES)
def test_onnxruntime_matches_torch_eval_at_any_batch(conv_mlp: Exported, batch: int) -> None:
    x = torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(batch))
    expected = torch_eval(conv_mlp.model, x)
    (actual,) = session(conv_mlp.path).run(None, {"image": x.numpy()})
    assert actual.shape == expected.shape == (batch, len(LABELS))
    assert float(np.abs(actual - expected).max()) <= bound(expected)
    # The BatchNorms matter: without them the outputs would be far from these.
    assert float(np.abs(expected).max()) > 0.1


def test_onnxruntime_runs_are_deterministic(conv_mlp: Exported) -> None:
    x = torch.randn(7, 3, 6, 6, generator=torch.Generator().manual_seed(SEED)).numpy()
    first = session(conv_mlp.path).run(None, {"image": x})[0]
    again = session(conv_mlp.path)
    second, third = again.run(None, {"image": x})[0], again.run(None, {"image": x})[0]
    assert np.array_equal(first, second) and np.array_equal(second, third)


def test_callers_model_stays_in_train_mode_and_unchanged(conv_mlp: Exported) -> None:
    conv_mlp.assert_unchanged()
    assert all(m.training for m in conv_mlp.model.modules())


def test_parity_is_reported_within_its_bound(conv_mlp: Exported) -> None:
    report = conv_mlp.report
    assert 0.0 < report.parity_max_abs_error <= report.parity_bound
    # Held to the float64 rule: torch's own float32 error, measured, sets the bound.
    assert report.parity_fallback is None and report.parity_torch_error is not None
    assert report.parity_bound >= PARITY_FLOOR
    assert report.parity_batches == [1, 7, 64]  # small inputs: the batch sizes are not capped


def test_metadata_props_record_fold_labels_and_parity(conv_mlp: Exported) -> None:
    props = {p.key: p.value for p in onnx.load(str(conv_mlp.path)).metadata_props}
    assert props["normserve.bn_folded"] == "2/2"
    assert json.loads(props["normserve.labels"]) == LABELS
    assert props["normserve.source"] == "tests"
    assert props["normserve.extra"] == "kept"
    recorded = float(props["normserve.parity_max_abs_error"])
    assert recorded == pytest.approx(conv_mlp.report.parity_max_abs_error, rel=1e-3, abs=1e-12)
    assert props == conv_mlp.report.metadata


def test_summary_reports_numbers(conv_mlp: Exported) -> None:
    summary = conv_mlp.report.summary()
    assert "BN folded 2/2" in summary
    assert "BatchNormalization 0" in summary
    assert f"opset {DEFAULT_OPSET}" in summary


def test_unfolded_reference_keeps_one_node_per_batchnorm(conv_mlp: Exported) -> None:
    ops = op_types(conv_mlp.unfolded)
    assert ops.count("BatchNormalization") == 2
    assert conv_mlp.report.nodes_before == len(ops)
    assert conv_mlp.report.nodes_before > conv_mlp.report.nodes_after
    onnx.checker.check_model(str(conv_mlp.unfolded), full_check=True)


# ---------------------------------------------------------------------------- LayerNorm, opset


@pytest.fixture(scope="module", params=[DEFAULT_OPSET, 17], ids=["opset18", "opset17"])
def layernorm_export(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[nn.Module, ExportReport, int]:
    torch.manual_seed(SEED)
    model = randomize_layernorms(PreNormBlock()).train()
    path = tmp_path_factory.mktemp("layernorm") / "model.onnx"
    report = export_onnx(model, torch.randn(2, 8, 16), path, opset=request.param)
    return model, report, request.param


def test_every_layernorm_call_is_one_layernormalization_node(
    layernorm_export: tuple[nn.Module, ExportReport, int],
) -> None:
    model, report, _ = layernorm_export
    ops = op_types(report.path)
    assert ops.count("LayerNormalization") == LAYERNORM_CALLS == report.layernorm_nodes
    assert (report.bn_folded, report.bn_kept) == (0, 0)
    x = torch.randn(5, 8, 16, generator=torch.Generator().manual_seed(SEED))
    expected = torch_eval(model, x)
    (actual,) = session(report.path).run(None, {"input": x.numpy()})
    assert float(np.abs(actual - expected).max()) <= bound(expected)


def test_requested_opset_is_the_written_opset(
    layernorm_export: tuple[nn.Module, ExportReport, int],
) -> None:
    """Opset 17 is converted down from the exporter's 18; the file must really say 17."""
    _, report, requested = layernorm_export
    written = {o.domain: o.version for o in onnx.load(str(report.path)).opset_import}[""]
    assert written == report.opset == requested
    assert f"opset {requested}" in report.summary()


class MeanPool(nn.Module):
    """x.mean(1) is ReduceMean, whose axes became an input in opset 18."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).mean(1)


def test_opset_the_converter_cannot_reach_is_an_error_not_a_silent_change(tmp_path: Path) -> None:
    """onnx's version converter cannot take this graph from 18 down to 17 and leaves it at 18."""
    path = tmp_path / "model.onnx"
    with pytest.raises(OpsetError, match="asked for opset 17 but the exporter wrote 18"):
        export_onnx(MeanPool(), torch.randn(2, 8, 16), path, opset=17)
    assert not path.exists()


@pytest.fixture
def no_export(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Records calls of torch.onnx.export; the refusals must come before any export."""
    calls: list[Any] = []

    def record(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        raise AssertionError("torch.onnx.export must not be called")

    monkeypatch.setattr(torch.onnx, "export", record)
    yield calls
    assert calls == []


@pytest.mark.parametrize("opset", [16, 13, 9])
def test_opset_below_17_is_refused_before_exporting(
    opset: int, tmp_path: Path, no_export: list[Any]
) -> None:
    path = tmp_path / "model.onnx"
    with pytest.raises(OpsetError, match="17"):
        export_onnx(PreNormBlock(), torch.randn(2, 8, 16), path, opset=opset)
    assert not path.exists()


def test_opset_error_is_an_export_error() -> None:
    assert issubclass(OpsetError, ExportError)
    assert issubclass(BatchDependentError, ExportError)
    assert issubclass(ParityError, ExportError)
    assert issubclass(ExportError, ValueError)


class NoRunningStats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).mean((2, 3))


def test_batch_dependent_batchnorm_is_refused(
    tmp_path: Path,
    no_export: list[Any],
    randomize_bn: Callable[..., nn.Module],
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    model = randomize_bn(NoRunningStats()).train()
    assert_unchanged = caller_snapshot(model)
    path = tmp_path / "model.onnx"
    with pytest.raises(BatchDependentError, match="track_running_stats") as caught:
        export_onnx(model, torch.randn(2, 3, 6, 6), path)
    assert "'bn'" in str(caught.value)
    assert not path.exists()
    assert_unchanged()


# ---------------------------------------------------------------------------- parity failures


class CountsCalls(nn.Module):
    """Deterministic per call in PyTorch, but the export bakes in the count it saw once."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x) * self.calls


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).flatten(1)


@pytest.mark.parametrize(
    ("build", "shape", "rule"),
    [
        # PyTorch's float32 and float64 runs disagree too (each call counts): only the cap on
        # PyTorch's own error (export.parity.PARITY_TORCH_CAP) keeps the bound from growing.
        pytest.param(CountsCalls, (2, 4), None, id="python-state-baked-in"),
        # The folded graph differs from the float64 model by float32 rounding, which no
        # bound this small admits: parity_rule must really be the rule used.
        pytest.param(ConvBN, (2, 3, 6, 6), IMPOSSIBLE, id="rounding-vs-tiny-bound"),
    ],
)
def test_mismatching_graph_raises_parity_error_and_writes_nothing(
    build: Callable[[], nn.Module],
    shape: tuple[int, ...],
    rule: ParityRule | None,
    tmp_path: Path,
    randomize_bn: Callable[..., nn.Module],
) -> None:
    torch.manual_seed(SEED)
    model = randomize_bn(build())
    path = tmp_path / "model.onnx"
    with pytest.raises(ParityError, match="exceeds the bound"):
        export_onnx(model, torch.randn(shape), path, parity_rule=rule)
    assert not path.exists()


class SqueezesBatch(nn.Module):
    """squeeze(0) removes the batch axis only at batch 1, which a dynamic export cannot know."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).squeeze(0)


def test_graph_the_checker_rejects_raises_an_export_error(tmp_path: Path) -> None:
    """Every way the file can be wrong is an ExportError that names the problem."""
    torch.manual_seed(SEED)
    path = tmp_path / "model.onnx"
    with pytest.raises(ExportError):
        export_onnx(SqueezesBatch(), torch.randn(2, 4), path)
    assert not path.exists()


# ---------------------------------------------------------------------------- outputs, batches


class Heads(NamedTuple):
    logits: torch.Tensor
    features: torch.Tensor


class Structured(nn.Module):
    """Returns a dict holding a dict, a tuple and a namedtuple."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        h = self.fc(x)
        return {"a": {"b": h[:, :2]}, "c": (h[:, 2:3], h[:, 3:4]), "d": Heads(h[:, 4:], -h)}


STRUCTURED_NAMES = ["a.b", "c_0", "c_1", "d.logits", "d.features"]


def test_structured_outputs_are_named_from_keys_and_checked_each(tmp_path: Path) -> None:
    torch.manual_seed(SEED)
    model = Structured()
    report = export_onnx(model, torch.randn(2, 4), tmp_path / "model.onnx")
    assert [o.name for o in report.outputs] == STRUCTURED_NAMES
    assert [o.shape for o in report.outputs] == [[-1, 2], [-1, 1], [-1, 1], [-1, 2], [-1, 6]]
    assert [o.name for o in onnx.load(str(report.path)).graph.output] == STRUCTURED_NAMES
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(SEED))
    got = session(report.path).run(None, {"input": x.numpy()})
    with torch.no_grad():
        out = model(x)
    want = [out["a"]["b"], *out["c"], out["d"].logits, out["d"].features]
    for g, w in zip(got, want, strict=True):
        assert float(np.abs(g - w.numpy()).max()) <= bound(w.numpy())


class Logits(NamedTuple):
    logits: torch.Tensor


@pytest.mark.parametrize(
    ("wrap", "name"),
    [(lambda t: t, "output"), (lambda t: (t,), "output"), (lambda t: {"probs": t}, "probs"),
     (Logits, "logits")],
    ids=["tensor", "1-tuple", "dict", "namedtuple"],
)  # fmt: skip
def test_a_single_output_is_named_from_its_key(
    wrap: Callable[[torch.Tensor], Any], name: str, tmp_path: Path
) -> None:
    class Wrapped(nn.Linear):
        def forward(self, x: torch.Tensor) -> Any:
            return wrap(super().forward(x))

    report = export_onnx(Wrapped(4, 3), torch.randn(2, 4), tmp_path / "model.onnx")
    assert [o.name for o in report.outputs] == [name]
    assert [o.name for o in onnx.load(str(report.path)).graph.output] == [name]


def test_explicit_output_names_must_match_the_flattened_count(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="2 output names for 5 outputs"):
        export_onnx(Structured(), torch.randn(2, 4), tmp_path / "m.onnx", output_names=["x", "y"])


@pytest.mark.parametrize(
    ("shape", "batches"),
    [((3, 224, 224), [1, 3]), ((3, 64, 64), [1, 5]), ((3, 32, 32), [1, 7, 21]),
     ((1, 8, 8), [1, 7, 64])],
)  # fmt: skip
def test_parity_batches_are_sized_by_the_input(shape: tuple[int, ...], batches: list[int]) -> None:
    """Batch 1 and one batch other than the export's 2 always: the batch axis is checked."""
    assert default_batches([torch.zeros(2, *shape)]) == batches
