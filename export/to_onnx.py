"""Fold, export to ONNX, and prove the file right: checker, graph properties, parity.

``export_onnx`` never trusts the exporter: it folds BatchNorm itself (so the property does
not depend on which exporter or optimizer ran), exports the folded eval-mode copy with a
dynamic batch axis (and the dynamic axes asked for, such as a sequence's length: export.axes
checks that they stayed dynamic) into one self-contained file, runs ``onnx.checker`` with the
full check, verifies the written opset, the absence of training-mode nodes and that every
LayerNorm call became a ``LayerNormalization`` node, and finally runs the file in onnxruntime
(graph optimizations disabled, so the exported graph's own numbers are checked) beside the
original PyTorch model in eval mode and a float64 copy of it, at batch sizes sized to the
input (export.parity has the rule). Any miss raises a named error that says by how much.

Time: one export (the unfolded one only when ``unfolded_path`` asks for it), one
serialization, one checker pass, one write; parity batches are sized to the input
(``export.parity.default_batches``). ``ExportReport.seconds`` holds each phase's time.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.utils import _pytree

from export import axes as dynamic
from export.axes import DynamicAxis
from export.fold import fold_batchnorm_with_report
from export.parity import (
    PARITY_MIN_OTHER_BATCH,
    ParityResult,
    ParityRule,
    check_parity,
    default_batches,
    default_lengths,
    flatten_outputs,
    parity_cases,
)
from export.report import ExportReport, TensorInfo

__all__ = [
    "BatchDependentError",
    "DynamicAxis",
    "ExportError",
    "ExportReport",
    "OpsetError",
    "ParityError",
    "TensorInfo",
    "export_onnx",
]

MIN_OPSET = 17  # LayerNorm is an ONNX operator from opset 17 on.
DEFAULT_OPSET = 18
# torch.export specializes a size-1 axis to a constant, so the export runs at batch 2.
EXPORT_BATCH = 2

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
    """onnxruntime's outputs differ from the reference by more than the bound (export.parity)."""


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    samples: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    parity_batches: Sequence[int] | None = None,
    parity_rule: ParityRule | None = None,
    labels: Sequence[str] | None = None,
    source: str = "",
    metadata: Mapping[str, str] | None = None,
    unfolded_path: str | Path | None = None,
    parity_reference: nn.Module | None = None,
    dynamic_axes: Sequence[DynamicAxis] = (),
) -> ExportReport:
    """Export ``model`` (any mode; never changed) to one ONNX file at ``path``.

    ``example_input`` holds batched example tensors (axis 0 is the batch axis, exported as
    dynamic). The model may return a tensor, or a dict / namedtuple / (nested) tuple of them:
    the outputs are named after the keys (``out``, ``aux``; nested ``a.b``, ``a_0``) unless
    ``output_names`` gives one name per tensor. ``samples`` are real inputs added to the parity
    check; ``parity_batches`` replaces the batch sizes sized to the input, ``parity_rule`` the
    default bound (export.parity). Raises ``ExportError`` subclasses when the result would not
    be the eval-mode model's function.

    ``parity_reference``: the module whose outputs the file must match, when that is not
    ``model`` in eval mode (export.batchstats holds its explicit graph against torch's own
    training-mode BatchNorm); called as given, under ``no_grad``.

    ``dynamic_axes``: axes besides the batch axis that take any size (a sequence's length,
    export.axes): exported as symbolic dims, checked to be symbolic in the written graph, and
    held to parity at lengths 1, the example's and a longer one. A model with BatchNorm
    statistics per time step is refused (``export.axes.DynamicAxisError``).
    """
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    path = Path(path)
    args, input_names = _arguments(example_input, input_names, opset)
    batches = list(parity_batches) if parity_batches is not None else default_batches(args)
    if any(b < 1 for b in batches) or not (batches or samples is not None):
        raise ExportError(f"parity needs batch sizes of at least 1 (or samples), got {batches}")
    _refuse_batch_dependent(model)
    by_input = dynamic.check_axes(dynamic_axes, input_names, args)
    reference = copy.deepcopy(model).eval()
    if by_input:
        dynamic.refuse_per_step_statistics(reference, args, by_input)
    export_args = tuple(_resize_batch(a, EXPORT_BATCH) for a in args)
    with _timed(seconds, "fold"):
        folded, fold_report = fold_batchnorm_with_report(model, export_args)
    # The first parity case also tells the output structure and the LayerNorm calls: one
    # forward less (a ResNet-50 at 224x224 costs ~0.1 s a sample).
    cases = parity_cases(args, batches, samples)
    lengths = _lengths(args, by_input)
    for length in lengths:
        if length != _length(args, by_input):
            longer = dynamic.resized(args, by_input, length)
            cases += parity_cases(longer, [PARITY_MIN_OTHER_BATCH], None)
    out, ln_calls = _forward_counting_layernorm(reference, cases[0])
    if by_input:
        # A loop over the sequence calls each step's LayerNorms once per step, but the graph
        # holds the step once (a Scan body): count the calls of a one-step sequence.
        one_step = tuple(dynamic.resized(cases[0], by_input, 1))
        ln_calls = _forward_counting_layernorm(reference, one_step)[1]
    shapes = dynamic.dynamic_shapes(len(args), by_input)
    outputs = _output_tensors(out)
    output_names = _output_names(out, output_names)

    before: onnx.ModelProto | None = None
    if unfolded_path is not None:
        with _timed(seconds, "unfolded"):
            before = _export_proto(
                reference, export_args, input_names, output_names, opset, False, shapes
            )
            _write_unfolded(before, Path(unfolded_path))
    with _timed(seconds, "export"):
        proto = _export_proto(folded, export_args, input_names, output_names, opset, True, shapes)
    with _timed(seconds, "check"):
        dynamic.check_graph_inputs(proto, input_names, by_input)
        data = _serialized(proto)
        _check_graph(proto, data, opset, ln_calls)

    with _timed(seconds, "parity"):
        known = None if parity_reference is not None else outputs  # of reference on cases[0]
        against = reference if parity_reference is None else parity_reference
        rule = parity_rule or ParityRule()
        result = _parity(against, data, cases, output_names, rule, known)
    worst = result.worst
    meta = {
        "normserve.source": source or type(model).__qualname__,
        "normserve.bn_folded": f"{len(fold_report.folded)}/{fold_report.total}",
        **({"normserve.labels": json.dumps(list(labels))} if labels is not None else {}),
        **(metadata or {}),
        "normserve.parity_max_abs_error": f"{worst.file_error:.3e}",
        "normserve.parity_reference": result.reference,
    }
    with _timed(seconds, "write"):
        _write(data, path, meta)
    seconds["total"] = time.perf_counter() - started
    ops = [n.op_type for n in dynamic.all_nodes(proto.graph)]
    output_infos = [_info(n, o) for n, o in zip(output_names, outputs, strict=True)]
    return ExportReport(
        path=path,
        opset=opset,
        bn_folded=len(fold_report.folded),
        bn_kept=len(fold_report.kept),
        kept_reasons=dict(fold_report.kept),
        batchnorm_nodes=ops.count("BatchNormalization"),
        layernorm_nodes=ops.count("LayerNormalization"),
        dropout_nodes=ops.count("Dropout"),
        nodes_before=None if before is None else len(before.graph.node),
        nodes_after=len(ops),
        params_before=None if before is None else _count_params(before),
        params_after=_count_params(proto),
        parity_max_abs_error=worst.file_error,
        parity_bound=worst.bound,
        parity_batches=[_batch(case) for case in cases],
        inputs=dynamic.infos(
            [_info(n, a) for n, a in zip(input_names, args, strict=True)], by_input
        ),
        outputs=dynamic.output_infos(proto, output_infos) if by_input else output_infos,
        metadata=meta,
        parity_torch_error=worst.torch_error,
        parity_fallback=result.fallback,
        seconds=seconds,
        parity_lengths=lengths,
    )


def _length(args: Sequence[torch.Tensor], by_input: Mapping[int, Mapping[int, DynamicAxis]]) -> int:
    """The example's size on the dynamic axes (export.axes.check_axes: at least 2)."""
    return min(int(args[i].shape[axis]) for i, specs in by_input.items() for axis in specs)


def _lengths(
    args: Sequence[torch.Tensor], by_input: Mapping[int, Mapping[int, DynamicAxis]]
) -> list[int]:
    """The lengths parity runs at (export.parity.default_lengths); none without dynamic axes."""
    if not by_input:
        return []
    caps = [s.max_size for specs in by_input.values() for s in specs.values() if s.max_size]
    return default_lengths(_length(args, by_input), min(caps) if caps else None)


def _arguments(
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    input_names: Sequence[str] | None,
    opset: int,
) -> tuple[tuple[torch.Tensor, ...], list[str]]:
    """The example tensors and their names; refused before anything is exported."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if opset < MIN_OPSET:
        raise OpsetError(
            f"opset {opset} is below {MIN_OPSET}: LayerNormalization (opset 17+) could not stay "
            f"one node; use --opset {MIN_OPSET} or higher"
        )
    if any(not isinstance(a, torch.Tensor) or a.dim() == 0 for a in args):
        raise ExportError("example_input must be batched tensors (axis 0 is the batch axis)")
    names = list(input_names or _default_names("input", len(args)))
    if len(names) != len(args):
        raise ExportError(f"{len(names)} input names for {len(args)} inputs")
    return args, names


@contextlib.contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = time.perf_counter() - start


# ---------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The exporter logs progress and optional-dependency warnings (torchvision) on every
    # call; the report says what matters.
    # onnx_ir warns that a Scan without per-step outputs has an empty attribute (typed INTS,
    # as ONNX wants it).
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _export_proto(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    optimize: bool,
    shapes: tuple[dict[int, torch.export.Dim], ...],
) -> onnx.ModelProto:
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=shapes,
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


def _check_graph(proto: onnx.ModelProto, data: bytes, opset: int, layernorm_calls: int) -> None:
    """The written opset, no training-mode nodes, each LayerNorm call one node, the checker."""
    written = {o.domain: o.version for o in proto.opset_import}.get("", 0)
    if written != opset:
        raise OpsetError(
            f"asked for opset {opset} but the exporter wrote {written}; choose an opset the "
            f"exporter supports (18 and above convert reliably)"
        )
    _refuse_training_nodes(proto)
    nodes = sum(n.op_type == "LayerNormalization" for n in dynamic.all_nodes(proto.graph))
    if nodes < layernorm_calls:
        raise ExportError(
            f"{layernorm_calls} LayerNorm calls became only {nodes} LayerNormalization nodes: "
            "the exporter decomposed LayerNorm"
        )
    _check(data)


def _serialized(proto: onnx.ModelProto) -> bytes:
    """The model's bytes without metadata, made once: the checker, onnxruntime and the write
    all take them (a ResNet-50 is 100 MB; each serialization costs ~0.1 s)."""
    del proto.metadata_props[:]
    data: bytes = proto.SerializeToString()
    return data


def _check(model: bytes) -> None:
    """The full checker (with shape inference), once, on the model in memory."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # the checker raises several unrelated exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"the exported graph fails onnx.checker: {first}; the model probably hard-codes "
            "a batch-dependent shape (squeeze/reshape on axis 0?)"
        ) from exc


def _write(model: bytes, path: Path, meta: Mapping[str, str]) -> None:
    """``model`` with ``meta`` as its metadata_props, written as one self-contained file (the
    service and clients load it without a sidecar .data file)."""
    entries = [onnx.StringStringEntryProto(key=k, value=v) for k, v in sorted(meta.items())]
    # Protobuf reads concatenated messages as one, repeated fields appended: the metadata
    # goes after the bytes already checked instead of serializing the whole model again.
    tail = onnx.ModelProto(metadata_props=entries).SerializeToString()
    # Written beside the target and renamed, so a reader never sees half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(model)
            f.write(tail)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_unfolded(proto: onnx.ModelProto, path: Path) -> None:
    data = _serialized(proto)
    _check(data)
    _write(data, path, {"normserve.source": "unfolded reference"})


def _refuse_training_nodes(proto: onnx.ModelProto) -> None:
    for node in dynamic.all_nodes(proto.graph):
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


def _refuse_batch_dependent(model: nn.Module) -> None:
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
            raise BatchDependentError(
                f"BatchNorm '{module_name}' has no running statistics "
                "(track_running_stats=False): even in eval mode it normalizes with the statistics "
                "of the batch, so a served prediction would depend on the other requests batched "
                "with it. Train with track_running_stats=True (or estimate the statistics on "
                "training data) and export again"
            )


def _forward_counting_layernorm(
    model: nn.Module, args: tuple[torch.Tensor, ...]
) -> tuple[Any, int]:
    """The model's output on ``args`` and how many LayerNorm calls made it (one forward)."""
    calls = 0

    def hook(*_: Any) -> None:
        nonlocal calls
        calls += 1

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.LayerNorm)
    ]
    try:
        with torch.no_grad():
            out = model(*args)
    finally:
        for h in handles:
            h.remove()
    return out, calls


def _count_params(proto: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer)


# ---------------------------------------------------------------------------- parity


def _parity(
    reference: nn.Module,
    model: bytes,
    cases: list[tuple[torch.Tensor, ...]],
    output_names: list[str],
    rule: ParityRule,
    first_outputs: list[torch.Tensor] | None,
) -> ParityResult:
    """export.parity's check of the serialized ``model`` in onnxruntime; ParityError on a
    miss."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Disabled so that the exported graph's own numbers are checked, not ORT's fusions of it.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ParityError(f"onnxruntime cannot load the exported file: {exc}") from exc
    result = check_parity(reference, session, cases, output_names, rule, first_outputs)
    if result.failure is not None:
        raise ParityError(result.failure)
    return result


# ---------------------------------------------------------------------------- helpers


def _output_tensors(out: Any) -> list[torch.Tensor]:
    leaves = flatten_outputs(out)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        kinds = sorted({type(t).__name__ for t in leaves if not isinstance(t, torch.Tensor)})
        raise ExportError(
            f"the model returns {type(out).__name__} holding {', '.join(kinds) or 'nothing'}; "
            "export needs tensors (alone, or in a dict, namedtuple, list or tuple)"
        )
    return leaves


def _output_names(out: Any, given: Sequence[str] | None) -> list[str]:
    """``given``, or names from the output's structure: ``output`` for a tensor,
    ``output_0..`` for a tuple, dict keys and namedtuple fields (nested: ``a.b``, ``a_0``)."""
    paths = [path for path, _ in _pytree.tree_flatten_with_path(out)[0]]
    if given is not None:
        names = list(given)
        if len(names) != len(paths):
            raise ExportError(f"{len(names)} output names for {len(paths)} outputs")
    else:
        names = [_name_of(path) for path in paths]
        if len(paths) == 1 and all(isinstance(k, _pytree.SequenceKey) for k in paths[0]):
            names = ["output"]  # a tensor in a 1-tuple, as a bare tensor
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ExportError(f"output names {duplicates} repeat; give output_names explicitly")
    return names


def _name_of(path: tuple[Any, ...]) -> str:
    name = ""
    for key in path:
        if isinstance(key, _pytree.SequenceKey):
            name = f"{name or 'output'}_{key.idx}"
        elif isinstance(key, _pytree.MappingKey):
            name = f"{name}.{key.key}" if name else str(key.key)
        elif isinstance(key, _pytree.GetAttrKey):
            name = f"{name}.{key.name}" if name else key.name
        else:  # a container type registered elsewhere: its own rendering
            name = f"{name}{key}"
    return name or "output"


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
