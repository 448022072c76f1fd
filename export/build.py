"""Build the default model repository: train what has no checkpoint, export, install.

Checkpoints are the training results (safetensors, git-ignored); the repository holds what
the service reads. Re-running is cheap: training happens only without a checkpoint, and
``skip_existing`` leaves models already in the repository alone.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from export.checkpoint import load_into, save_safetensors
from export.publish import publish
from export.to_onnx import ExportReport, export_onnx
from models import REGISTRY, ModelSpec
from models.data import Digits, load_digits_split
from models.train import evaluate, shape_for, train
from service.repository import CONFIG_FILE

DEFAULT_REPOSITORY = Path("model_repository")
DEFAULT_CHECKPOINTS = Path("checkpoints")


@dataclass
class BuiltModel:
    name: str
    test_accuracy: float
    trained: bool
    report: ExportReport | None  # None when skipped


def build_repository(
    repository: Path = DEFAULT_REPOSITORY,
    checkpoints: Path = DEFAULT_CHECKPOINTS,
    names: Sequence[str] | None = None,
    *,
    skip_existing: bool = False,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> list[BuiltModel]:
    """Train (if needed) and export the default models into ``repository`` as version 1."""
    unknown = sorted(set(names or []) - set(REGISTRY))
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; the defaults are {sorted(REGISTRY)}")
    data = load_digits_split()
    built = []
    for name in names or list(REGISTRY):
        spec = REGISTRY[name]
        if skip_existing and (repository / name / CONFIG_FILE).exists():
            log(f"[{name}] already in {repository}, skipped")
            built.append(BuiltModel(name, float("nan"), False, None))
            continue
        built.append(_build_one(spec, data, repository, checkpoints, log))
    return built


def trained_model(
    spec: ModelSpec,
    data: Digits,
    checkpoints: Path = DEFAULT_CHECKPOINTS,
    log: Callable[[str], None] = lambda line: None,
) -> tuple[nn.Module, bool]:
    """(the default model in eval mode, whether it was trained now): its checkpoint, or a
    deterministic training run whose result becomes the checkpoint."""
    checkpoint = checkpoints / f"{spec.name}.safetensors"
    if checkpoint.exists():
        return load_into(spec.build(), checkpoint).eval(), False
    log(f"[{spec.name}] no checkpoint at {checkpoint}: training")
    result = train(spec, data, progress=log)
    save_safetensors(
        result.model,
        checkpoint,
        {"model": spec.name, "test_accuracy": f"{result.test_accuracy:.4f}"},
    )
    return result.model, True


def _build_one(
    spec: ModelSpec,
    data: Digits,
    repository: Path,
    checkpoints: Path,
    log: Callable[[str], None],
) -> BuiltModel:
    model, trained = trained_model(spec, data, checkpoints, log)
    _, accuracy = evaluate(model, spec, data.test)
    log(f"[{spec.name}] test accuracy {accuracy:.2%} on {len(data.test)} held-out digits")
    started = time.perf_counter()
    samples = shape_for(spec, data.test.images)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        report = export_onnx(
            model,
            samples[:8],
            onnx_path,
            input_names=[spec.input_name],
            output_names=[spec.output_name],
            samples=samples,
            labels=spec.labels,
            source=f"{type(model).__module__}.{type(model).__qualname__}",
            metadata={"normserve.test_accuracy": f"{accuracy:.4f}"},
        )
        publish(
            repository,
            spec.name,
            report,
            description=spec.description,
            labels=spec.labels,
            version=1,
            replace=True,
            metrics={"test_accuracy": round(accuracy, 4)},
        )
    log(
        f"[{spec.name}] exported in {time.perf_counter() - started:.1f} s: {report.summary()} "
        f"-> {repository / spec.name}"
    )
    return BuiltModel(spec.name, accuracy, trained, report)
