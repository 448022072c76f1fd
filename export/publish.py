"""Turn an ExportReport into a repository entry, through service/repository.py's models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from export.to_onnx import ExportReport, TensorInfo
from service.repository import (
    ModelConfig,
    ModelVersion,
    TensorSpec,
    install_model,
    next_version,
    now,
)

DEFAULT_MAX_BATCH = 64


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
    """Install ``report.path`` as ``name`` (version: given, else the next free one)."""
    config = ModelConfig(
        name=name,
        description=description,
        max_batch_size=max_batch_size,
        inputs=[_spec(t) for t in report.inputs],
        outputs=[_spec(t) for t in report.outputs],
        labels=list(labels) if labels is not None else None,
        batch_dependent=batch_dependent,
        derived_from=derived_from,
    )
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


def _spec(t: TensorInfo) -> TensorSpec:
    return TensorSpec.model_validate({"name": t.name, "datatype": t.datatype, "shape": t.shape})
