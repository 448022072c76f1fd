"""Turn an ExportReport into a repository entry, through service/repository.py's models.

The entry is checked before anything is written, and can be checked before the export runs
(``check_name``, ``check_labels``, ``entry_config`` and ``check_install`` take the signature
alone): a name the repository
refuses, labels that name no output's columns, or a same-named model with another signature
fail with one ``PublishError`` line instead of pydantic's dump.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import ValidationError

from export.to_onnx import ExportReport, TensorInfo
from service.repository import (
    CONFIG_FILE,
    MODEL_NAME,
    ModelConfig,
    ModelVersion,
    TensorSpec,
    install_model,
    next_version,
    now,
    read_config,
)

DEFAULT_MAX_BATCH = 64


class PublishError(ValueError):
    """The export cannot become the repository entry asked for; the message says what to do."""


class LabelsMismatch(PublishError):
    """The label count is not the width of any [batch, C] output."""


class SignatureConflict(PublishError):
    """A model of that name exists with other inputs/outputs and replacing was not asked."""


def publish(
    repository: Path,
    name: str,
    report: ExportReport,
    *,
    description: str = "",
    labels: Sequence[str] | None = None,
    version: int | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    replace: bool = False,
    metrics: Mapping[str, float] | None = None,
    batch_dependent: bool = False,
    derived_from: str | None = None,
) -> ModelConfig:
    """Install ``report.path`` as ``name`` (version: given, else the next free one).

    Raises ``PublishError`` (nothing written) when ``entry_config`` or ``check_install``
    refuse the entry.
    """
    config = entry_config(
        name,
        report.inputs,
        report.outputs,
        description=description,
        labels=labels,
        max_batch_size=max_batch_size,
        batch_dependent=batch_dependent,
        derived_from=derived_from,
    )
    check_install(repository, name, report.inputs, report.outputs, replace=replace, version=version)
    record = ModelVersion(
        version=next_version(repository, name) if version is None else version,
        sha256="0" * 64,  # computed by install_model from the copied bytes
        opset=report.opset,
        exported_at=now(),
        source=report.metadata.get("normserve.source", ""),
        bn_folded=report.bn_folded,
        bn_kept=report.bn_kept,
        layernorm_nodes=report.layernorm_nodes,
        parity_max_abs_error=report.parity_max_abs_error,
        parity_bound=report.parity_bound,
        metrics=dict(metrics or {}),
    )
    return install_model(repository, config, report.path, record, replace=replace)


def entry_config(
    name: str,
    inputs: Sequence[TensorInfo],
    outputs: Sequence[TensorInfo],
    *,
    description: str = "",
    labels: Sequence[str] | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    batch_dependent: bool = False,
    derived_from: str | None = None,
) -> ModelConfig:
    """The repository config (no versions yet) for this signature, or ``PublishError``."""
    check_name(name)
    if labels is not None:
        check_labels(labels, outputs)
    try:
        return ModelConfig(
            name=name,
            description=description,
            max_batch_size=max_batch_size,
            inputs=[_spec(t) for t in inputs],
            outputs=[_spec(t) for t in outputs],
            labels=list(labels) if labels is not None else None,
            batch_dependent=batch_dependent,
            derived_from=derived_from,
        )
    except ValidationError as exc:
        raise PublishError(f"model '{name}': {_problems(exc)}") from None


def check_labels(labels: Sequence[str], outputs: Sequence[TensorInfo]) -> None:
    """Labels name the columns of a [batch, C] output: C must be their count (the
    repository's own rule, ModelConfig, checked first for a message that shows the outputs)."""
    widths = sorted({t.shape[-1] for t in outputs if len(t.shape) == 2})
    if not labels:
        raise LabelsMismatch("the label list is empty: give one label per output column")
    if len(labels) not in widths:
        shapes = ", ".join(f"'{t.name}' {t.shape}" for t in outputs)
        raise LabelsMismatch(
            f"{len(labels)} labels, but no output has {len(labels)} columns (outputs: {shapes}): "
            "give one label per column of a [batch, C] output"
        )


def check_name(name: str) -> None:
    """The repository's allow-list for model names (they become directory names)."""
    if not MODEL_NAME.match(name):
        raise PublishError(
            f"model name '{name}' is not allowed: 1 to 128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


def check_install(
    repository: Path,
    name: str,
    inputs: Sequence[TensorInfo],
    outputs: Sequence[TensorInfo] | None = None,
    *,
    replace: bool = False,
    version: int | None = None,
) -> None:
    """Refuse, before anything is written, a version number below 1 and a signature that
    differs from a same-named model's unless ``replace`` (which drops its versions).
    ``outputs`` None: compare the inputs only (the outputs are not known yet)."""
    if version is not None and version < 1:
        raise PublishError(f"version {version}: versions are numbered from 1")
    path = repository / name / CONFIG_FILE
    if replace or not path.exists():
        return
    existing = read_config(path)
    new_inputs = [_spec(t) for t in inputs]
    new_outputs = existing.outputs if outputs is None else [_spec(t) for t in outputs]
    if existing.inputs != new_inputs or existing.outputs != new_outputs:
        raise SignatureConflict(
            f"model '{name}' already exists in {repository} with another signature "
            f"({_signature(existing.inputs, existing.outputs)}, now "
            f"{_signature(new_inputs, None if outputs is None else new_outputs)}): choose "
            "another name, or replace it and drop its versions (--replace; replace=True in "
            "Python)"
        )


def _signature(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec] | None) -> str:
    def side(specs: Sequence[TensorSpec]) -> str:
        return ", ".join(f"{s.name}:{s.datatype}{s.shape}" for s in specs)

    shown = f"inputs {side(inputs)}"
    return shown if outputs is None else f"{shown} -> outputs {side(outputs)}"


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
    )


def _spec(t: TensorInfo) -> TensorSpec:
    fields = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
    return TensorSpec.model_validate(fields | ({"max_shape": t.max_shape} if t.max_shape else {}))
