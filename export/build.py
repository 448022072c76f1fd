"""Build the default model repository: train what has no checkpoint, export, install.

Checkpoints are the training results (safetensors, git-ignored); the repository holds what
the service reads. Re-running is cheap: training happens only without a checkpoint, and
``skip_existing`` leaves models already in the repository alone.

Besides the three default models the repository gets ``digits_cnn_batchstats`` (digits_cnn's
checkpoint exported with batch statistics, see export/batchstats.py) and the digits test
split as a data file for the web page (service/webdata.py): the service imports neither
torch nor scikit-learn, so both are computed here.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from export.axes import DynamicAxis
from export.batchstats import accuracy_in_batches, export_batch_statistics
from export.checkpoint import load_into, save_safetensors
from export.publish import publish
from export.to_onnx import ExportReport, export_onnx
from models import REGISTRY, ModelSpec
from models.data import LABELS, MAX_INTENSITY, SPLIT_SEED, Digits, load_digits_split
from models.train import evaluate, shape_for, train
from service.repository import CONFIG_FILE
from service.webdata import SAMPLES_PATH, DigitSamples, write_samples

DEFAULT_REPOSITORY = Path("model_repository")
DEFAULT_CHECKPOINTS = Path("checkpoints")
BATCHSTATS = "digits_cnn_batchstats"
# Exports of a default model's checkpoint (not trained themselves): name -> that model.
DERIVED = {BATCHSTATS: "digits_cnn"}
BUILDABLE = [*REGISTRY, *DERIVED]
# The web page's batch: the drawn digit and 31 test digits.
PAGE_BATCH = 32
BATCHSTATS_DESCRIPTION = (
    "digits_cnn's weights with every BatchNorm normalizing with the statistics of the batch it "
    "is given (BatchNorm's training-mode forward: batch mean and biased variance, running "
    "statistics unused), Dropout off. Batch-dependent by design: each request runs as its own "
    "batch and a row's answer depends on the rows sent with it (alone, every input gets the "
    "same answer). For showing train vs inference, not for predictions. Input: grey "
    "intensities in [0, 1], ink = 1."
)


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
    """Train (if needed) and export the default models into ``repository`` as version 1,
    and write the test samples file."""
    unknown = sorted(set(names or []) - set(BUILDABLE))
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; the defaults are {BUILDABLE}")
    data = load_digits_split()
    built = []
    for name in names or BUILDABLE:
        if skip_existing and (repository / name / CONFIG_FILE).exists():
            log(f"[{name}] already in {repository}, skipped")
            built.append(BuiltModel(name, float("nan"), False, None))
        elif name in DERIVED:
            built.append(_build_batchstats(name, data, repository, checkpoints, log))
        else:
            built.append(_build_one(REGISTRY[name], data, repository, checkpoints, log))
    _write_samples(repository, data, skip_existing, log)
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


def dynamic_axes(spec: ModelSpec) -> list[DynamicAxis]:
    """The registry's -1 axes (a sequence's length) as the export tool takes them, capped at
    ``spec.max_length``; the example's size there is the digits' 8 rows."""
    return [
        DynamicAxis(spec.input_name, axis + 1, spec.max_length)
        for axis, dim in enumerate(spec.input_shape)
        if dim == -1
    ]


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
            dynamic_axes=dynamic_axes(spec),
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


def _build_batchstats(
    name: str,
    data: Digits,
    repository: Path,
    checkpoints: Path,
    log: Callable[[str], None],
) -> BuiltModel:
    spec = REGISTRY[DERIVED[name]]
    model, trained = trained_model(spec, data, checkpoints, log)
    samples = shape_for(spec, data.test.images)
    accuracy = accuracy_in_batches(model, samples, data.test.labels, PAGE_BATCH)
    log(f"[{name}] test accuracy {accuracy:.2%} in batches of {PAGE_BATCH} (batch statistics)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = export_batch_statistics(
            model,
            samples,
            Path(tmp) / "model.onnx",
            input_names=[spec.input_name],
            output_names=[spec.output_name],
            labels=spec.labels,
            source=f"export.batchstats.with_batch_statistics({type(model).__qualname__})",
        )
        publish(
            repository,
            name,
            report,
            description=BATCHSTATS_DESCRIPTION,
            labels=spec.labels,
            version=1,
            replace=True,
            metrics={f"test_accuracy_in_batches_of_{PAGE_BATCH}": round(accuracy, 4)},
            batch_dependent=True,
            derived_from=spec.name,
        )
    log(
        f"[{name}] exported in {time.perf_counter() - started:.1f} s: {report.summary()} "
        f"-> {repository / name}"
    )
    return BuiltModel(name, accuracy, trained, report)


def page_samples(data: Digits) -> DigitSamples:
    """The test split as the web page gets it: the data set's own integers 0..16."""
    images = (data.test.images * MAX_INTENSITY).round().to(torch.int64)
    return DigitSamples(
        source=(
            "sklearn.datasets.load_digits, test split of models/data.py (stratified 60/20/20, "
            f"seed {SPLIT_SEED})"
        ),
        scale=int(MAX_INTENSITY),
        labels=[LABELS[int(label)] for label in data.test.labels],
        images=images.reshape(len(data.test), -1).tolist(),
    )


def _write_samples(
    repository: Path, data: Digits, skip_existing: bool, log: Callable[[str], None]
) -> None:
    if skip_existing and (repository / SAMPLES_PATH).exists():
        log(f"[samples] already in {repository}, skipped")
        return
    path = write_samples(repository, page_samples(data))
    log(f"[samples] {len(data.test)} test digits -> {path}")
