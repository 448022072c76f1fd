"""Fold, export to ONNX, and prove the file right: checker, graph properties, parity.

``export_onnx`` never trusts the exporter: it folds BatchNorm itself (so the property does
not depend on which exporter or optimizer ran), exports the folded eval-mode copy with a
dynamic batch axis into one self-contained file, runs ``onnx.checker`` with the full check,
verifies the written opset, the absence of training-mode nodes and that every LayerNorm call
became a ``LayerNormalization`` node, and finally compares onnxruntime (graph optimizations
disabled, so the exported graph's own numbers are checked) with the original PyTorch model
in eval mode at several batch sizes. Any miss raises a named error that says by how much.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from export.fold import FoldReport, fold_batchnorm_with_report

MIN_OPSET = 17  # LayerNormalization is an ONNX operator from opset 17 on.
DEFAULT_OPSET = 18
# Parity bound: max|ort - torch| <= PARITY_RTOL * max(1, max|torch|). Relative to the output's
# magnitude because folded weights can be large when running variances are tiny.
PARITY_RTOL = 1e-5
PARITY_BATCHES = (1, 7, 64)
PARITY_SEED = 0

_TORCH_TO_V2 = {
    torch.float32: "FP32", torch.float16: "FP16", torch.float64: "FP64", torch.int64: "INT64",
    torch.int32: "INT32", torch.int16: "INT16", torch.int8: "INT8", torch.uint8: "UINT8",
    torch.bool: "BOOL",
}  # fmt: skip


class ExportError(ValueError):
    """The model cannot be exported correctly; the message says why and what to change."""


class OpsetError(ExportError):
    """The requested opset is not supported or the exporter wrote another one."""


class BatchDependentError(ExportError):
    """The eval-mode model mixes samples of a batch, so it cannot be served with batching."""


class ParityError(ExportError):
    """onnxruntime's outputs differ from PyTorch's by more than the bound."""


@dataclass
class TensorInfo:
    name: str
    datatype: str
    shape: list[int]


@dataclass
class ExportReport:
    """What was exported and the evidence that it is right."""

    path: Path
    opset: int
    bn_folded: int
    bn_kept: int
    kept_reasons: dict[str, str]
    batchnorm_nodes: int
    layernorm_nodes: int
    dropout_nodes: int
    # The unfolded eval model exported without the exporter's optimizer (each BN its own node)
    # versus the file written; params counts the initializer elements of each.
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    parity_max_abs_error: float
    parity_bound: float
    parity_batches: list[int]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"parity max|Δ|={self.parity_max_abs_error:.1e} (bound {self.parity_bound:.1e}, "
            f"batches {','.join(map(str, self.parity_batches))}), "
            f"BN folded {self.bn_folded}/{self.bn_folded + self.bn_kept}, "
            f"BatchNormalization {self.batchnorm_nodes}, "
            f"LayerNormalization {self.layernorm_nodes}, "
            f"nodes {self.nodes_before}→{self.nodes_after}, opset {self.opset}"
        )


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    samples: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    parity_batches: Sequence[int] = PARITY_BATCHES,
    parity_rtol: float = PARITY_RTOL,
    labels: Sequence[str] | None = None,
    source: str = "",
    metadata: Mapping[str, str] | None = None,
    unfolded_path: str | Path | None = None,
    parity_reference: nn.Module | None = None,
) -> ExportReport:
    """Export ``model`` (any mode; never changed) to one ONNX file at ``path``.

    ``example_input`` holds batched example tensors (axis 0 is the batch axis, exported as
    dynamic). ``samples`` are real inputs added to the parity check. Raises ``ExportError``
    subclasses when the result would not be the eval-mode model's function.

    ``parity_reference``: the module whose outputs the file must match, when that is not
    ``model`` in eval mode (export.batchstats holds its explicit graph against torch's own
    training-mode BatchNorm); called as given, under ``no_grad``.
    """
    path = Path(path)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if opset < MIN_OPSET:
        raise OpsetError(
            f"opset {opset} is below {MIN_OPSET}: LayerNormalization (opset 17+) could not stay "
            f"one node; use --opset {MIN_OPSET} or higher"
        )
    if any(not isinstance(a, torch.Tensor) or a.dim() == 0 for a in args):
        raise ExportError("example_input must be batched tensors (axis 0 is the batch axis)")
    input_names = list(input_names or _default_names("input", len(args)))
    if len(input_names) != len(args):
        raise ExportError(f"{len(input_names)} input names for {len(args)} inputs")
    reference = copy.deepcopy(model).eval()
    parity_against = reference if parity_reference is None else parity_reference
    folded, fold_report = fold_batchnorm_with_report(model, args)
    _refuse_batch_dependent(fold_report, folded)
    # Export at batch 2: torch.export specializes a size-1 axis to a constant.
    export_args = tuple(_resize_batch(a, 2) for a in args)
    with torch.no_grad():
        out = _as_tuple(reference(*export_args))
    output_names = list(output_names or _default_names("output", len(out)))
    if len(output_names) != len(out):
        raise ExportError(f"{len(output_names)} output names for {len(out)} outputs")

    before = _export_proto(reference, export_args, input_names, output_names, opset, False)
    if unfolded_path is not None:
        _save(before, Path(unfolded_path), {"normserve.source": "unfolded reference"})
    proto = _export_proto(folded, export_args, input_names, output_names, opset, True)
    written = {o.domain: o.version for o in proto.opset_import}.get("", 0)
    if written != opset:
        raise OpsetError(
            f"asked for opset {opset} but the exporter wrote {written}; choose an opset the "
            f"exporter supports (18 and above convert reliably)"
        )
    ops = [n.op_type for n in proto.graph.node]
    _refuse_training_nodes(proto)
    ln_calls = _count_layernorm_calls(reference, export_args)
    if ops.count("LayerNormalization") < ln_calls:
        raise ExportError(
            f"{ln_calls} LayerNorm calls became only {ops.count('LayerNormalization')} "
            "LayerNormalization nodes: the exporter decomposed LayerNorm"
        )

    meta = {
        "normserve.source": source or type(model).__qualname__,
        "normserve.bn_folded": f"{len(fold_report.folded)}/{fold_report.total}",
        **({"normserve.labels": json.dumps(list(labels))} if labels is not None else {}),
        **(metadata or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    batches = list(parity_batches)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "model.onnx"
        _save(proto, candidate, meta)
        error, bound = _parity(parity_against, candidate, args, samples, batches, parity_rtol)
        meta["normserve.parity_max_abs_error"] = f"{error:.3e}"
        _save(proto, path, meta)
    return ExportReport(
        path=path,
        opset=written,
        bn_folded=len(fold_report.folded),
        bn_kept=len(fold_report.kept),
        kept_reasons=dict(fold_report.kept),
        batchnorm_nodes=ops.count("BatchNormalization"),
        layernorm_nodes=ops.count("LayerNormalization"),
        dropout_nodes=ops.count("Dropout"),
        nodes_before=len(before.graph.node),
        nodes_after=len(ops),
        params_before=_count_params(before),
        params_after=_count_params(proto),
        parity_max_abs_error=error,
        parity_bound=bound,
        parity_batches=batches + ([int(_batch(samples))] if samples is not None else []),
        inputs=[_info(n, a) for n, a in zip(input_names, args, strict=True)],
        outputs=[_info(n, o) for n, o in zip(output_names, out, strict=True)],
        metadata=meta,
    )


# ---------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The exporter logs progress and optional-dependency warnings (torchvision) on every
    # call; the report says what matters.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _export_proto(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    optimize: bool,
) -> onnx.ModelProto:
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} for _ in args)
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic,
                opset_version=opset,
                external_data=False,
                optimize=optimize,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(
            f"torch.onnx.export failed for {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    return program.model_proto


def _save(proto: onnx.ModelProto, path: Path, meta: Mapping[str, str]) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    del model.metadata_props[:]
    for key, value in sorted(meta.items()):
        model.metadata_props.add(key=key, value=value)
    # One self-contained file: the service and clients load it without a sidecar .data file.
    # Written beside the target and renamed only once the checker accepts it.
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save_model(model, str(tmp), save_as_external_data=False)
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as exc:  # the checker raises several unrelated exception types
        tmp.unlink(missing_ok=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"the exported graph fails onnx.checker: {first}; the model probably hard-codes "
            "a batch-dependent shape (squeeze/reshape on axis 0?)"
        ) from exc
    tmp.replace(path)


def _refuse_training_nodes(proto: onnx.ModelProto) -> None:
    for node in proto.graph.node:
        if node.op_type == "Dropout":
            raise ExportError(
                f"node '{node.name}' is a Dropout: training-mode Dropout makes outputs random"
            )
        if node.op_type == "BatchNormalization":
            for attr in node.attribute:
                if attr.name == "training_mode" and attr.i:
                    raise ExportError(
                        f"node '{node.name}' is a BatchNormalization in training mode: its "
                        "output would depend on the batch"
                    )


def _refuse_batch_dependent(report: FoldReport, folded: nn.Module) -> None:
    for module_name, module in folded.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
            raise BatchDependentError(
                f"BatchNorm '{module_name}' has no running statistics "
                "(track_running_stats=False): even in eval mode it normalizes with the statistics "
                "of the batch, so a served prediction would depend on the other requests batched "
                "with it. Train with track_running_stats=True (or estimate the statistics on "
                "training data) and export again"
            )


def _count_layernorm_calls(model: nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    calls = 0

    def hook(*_: Any) -> None:
        nonlocal calls
        calls += 1

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.LayerNorm)
    ]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return calls


def _count_params(proto: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer)


# ---------------------------------------------------------------------------- parity


def _parity(
    reference: nn.Module,
    onnx_path: Path,
    args: tuple[torch.Tensor, ...],
    samples: torch.Tensor | tuple[torch.Tensor, ...] | None,
    batches: list[int],
    rtol: float,
) -> tuple[float, float]:
    """(max abs error, bound) of onnxruntime against PyTorch; raises ParityError on a miss."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Disabled so that the exported graph's own numbers are checked, not ORT's fusions of it.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    generator = torch.Generator().manual_seed(PARITY_SEED)
    cases = [tuple(_random_like(a, b, generator) for a in args) for b in batches]
    if samples is not None:
        cases.append(samples if isinstance(samples, tuple) else (samples,))
    worst_error, worst_bound, worst_ratio = 0.0, 0.0, -1.0
    for case in cases:
        with torch.no_grad():
            expected = [t.double().numpy() for t in _as_tuple(reference(*case))]
        feeds = {n: a.numpy() for n, a in zip(names, case, strict=True)}
        actual = session.run(None, feeds)
        for want, got in zip(expected, actual, strict=True):
            if got.shape != want.shape:
                raise ParityError(
                    f"output shape {list(got.shape)} from onnxruntime differs from PyTorch's "
                    f"{list(want.shape)} at batch {_batch(case)}"
                )
            error = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
            bound = rtol * max(1.0, float(np.max(np.abs(want))) if want.size else 0.0)
            if not np.isfinite(error) or error > bound:
                raise ParityError(
                    f"onnxruntime differs from PyTorch at batch {_batch(case)}: "
                    f"max|Δ|={error:.3e} exceeds the bound {bound:.3e} by {error / bound:.1f}x"
                )
            if error / bound > worst_ratio:
                worst_error, worst_bound, worst_ratio = error, bound, error / bound
    return worst_error, worst_bound


def _random_like(example: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    shape = (batch, *example.shape[1:])
    if example.is_floating_point():
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(example.dtype)
    if example.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    high = int(example.max()) + 1 if example.numel() else 2
    return torch.randint(0, max(high, 2), shape, generator=generator, dtype=example.dtype)


# ---------------------------------------------------------------------------- helpers


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return tuple(out)
    raise ExportError(
        f"the model returns {type(out).__name__}; export needs a tensor or a tuple of tensors"
    )


def _resize_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    reps = -(-batch // t.shape[0])
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch].clone()


def _batch(case: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    first = case[0] if isinstance(case, tuple) else case
    return int(first.shape[0])


def _default_names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def _info(name: str, t: torch.Tensor) -> TensorInfo:
    datatype = _TORCH_TO_V2.get(t.dtype)
    if datatype is None:
        raise ExportError(f"tensor '{name}' has dtype {t.dtype}, which V2 clients cannot send")
    return TensorInfo(name, datatype, [-1, *t.shape[1:]])
