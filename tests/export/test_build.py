"""The default repository as `make serve` builds it: trained, folded, exported, verified."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.batchstats import torch_batch_statistics
from export.build import BATCHSTATS, PAGE_BATCH
from export.checkpoint import load_into
from models import REGISTRY
from models.data import MAX_INTENSITY, load_digits_split
from models.train import shape_for
from service.repository import list_models, sha256_file, verified_file
from service.webdata import SAMPLES_PATH, DigitSamples

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PARITY_RTOL = 1e-5  # the export tool's bound: max|ort - torch| <= 1e-5 * max(1, max|torch|)


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_repository_has_the_three_defaults_verified(built_repository: tuple) -> None:
    repository, _, log = built_repository
    configs = {c.name: c for c in list_models(repository)}
    assert set(configs) == {*REGISTRY, BATCHSTATS}
    for name in REGISTRY:
        config = configs[name]
        assert not config.batch_dependent
        assert [v.version for v in config.versions] == [1]
        path = verified_file(repository, config, config.latest)  # sha256 as recorded
        assert path == repository / name / "1" / "model.onnx"
        assert not list(path.parent.glob("*.data")), "weights must be inside the one file"
        assert config.labels == REGISTRY[name].labels
        assert config.inputs[0].shape == [-1, *REGISTRY[name].input_shape]
        assert config.outputs[0].shape == [-1, 10]
        assert config.latest.parity_max_abs_error <= config.latest.parity_bound
        assert config.latest.opset >= 17
    # Progress was shown while training.
    if os.environ.get("NORMSERVE_TEST_CHECKPOINTS"):  # tests/conftest.py: built_repository
        pytest.skip("NORMSERVE_TEST_CHECKPOINTS is set: the models were not trained in this run")
    assert log.count("epoch") >= sum(s.recipe.epochs for s in REGISTRY.values())


def test_cnn_has_every_batchnorm_folded(built_repository: tuple) -> None:
    repository, _, _ = built_repository
    config = {c.name: c for c in list_models(repository)}["digits_cnn"]
    ops = _ops(repository / "digits_cnn" / "1" / "model.onnx")
    assert ops.count("BatchNormalization") == 0
    assert ops.count("Conv") == 3 and ops.count("Gemm") == 2
    assert config.latest.bn_folded == 4 and config.latest.bn_kept == 0


@pytest.mark.parametrize(("name", "calls"), [("digits_transformer", 5), ("digits_recurrent", 24)])
def test_sequence_models_keep_layernorm_nodes(
    built_repository: tuple, name: str, calls: int
) -> None:
    repository, _, _ = built_repository
    ops = _ops(repository / name / "1" / "model.onnx")
    assert ops.count("LayerNormalization") == calls
    assert "ReduceMean" not in ops or name == "digits_transformer"  # mean-pool, not a norm
    assert "BatchNormalization" not in ops and "Dropout" not in ops


@pytest.mark.parametrize("name", list(REGISTRY))
def test_served_file_matches_checkpoint_and_reaches_accuracy(
    built_repository: tuple, name: str
) -> None:
    repository, checkpoints, _ = built_repository
    spec = REGISTRY[name]
    data = load_digits_split()
    x = shape_for(spec, data.test.images)
    model = load_into(spec.build(), checkpoints / f"{name}.safetensors").eval()
    with torch.no_grad():
        expected = model(x).numpy()
    (logits,) = _session(repository / name / "1" / "model.onnx").run(None, {"image": x.numpy()})
    error = float(np.max(np.abs(logits - expected)))
    assert error <= PARITY_RTOL * max(1.0, float(np.max(np.abs(expected))))
    accuracy = float((logits.argmax(axis=1) == data.test.labels.numpy()).mean())
    assert accuracy >= spec.min_test_accuracy, f"{name}: {accuracy:.2%}"
    config = {c.name: c for c in list_models(repository)}[name]
    assert abs(config.latest.metrics["test_accuracy"] - accuracy) < 1e-3
    meta = {
        p.key: p.value
        for p in onnx.load(str(repository / name / "1" / "model.onnx")).metadata_props
    }
    assert meta["normserve.source"].endswith(type(model).__qualname__)
    assert "normserve.parity_max_abs_error" in meta and "normserve.labels" in meta


def test_batchstats_model_is_torchs_training_batchnorm(built_repository: tuple) -> None:
    repository, checkpoints, _ = built_repository
    config = {c.name: c for c in list_models(repository)}[BATCHSTATS]
    assert config.batch_dependent and config.derived_from == "digits_cnn"
    assert [v.version for v in config.versions] == [1]
    assert (
        config.inputs[0].shape == [-1, 1, 8, 8] and config.labels == REGISTRY["digits_cnn"].labels
    )
    assert config.latest.parity_max_abs_error <= config.latest.parity_bound
    assert config.latest.bn_folded == 0
    path = verified_file(repository, config, config.latest)
    ops = _ops(path)
    assert "BatchNormalization" not in ops and "Dropout" not in ops and "ReduceMean" in ops
    data = load_digits_split()
    x = shape_for(REGISTRY["digits_cnn"], data.test.images)
    model = load_into(REGISTRY["digits_cnn"].build(), checkpoints / "digits_cnn.safetensors")
    reference = torch_batch_statistics(model)
    session = _session(path)
    correct = 0
    assert len(x) % PAGE_BATCH > 1  # no last batch of one row, which torch would refuse
    for start in range(0, len(x), PAGE_BATCH):
        end = start + PAGE_BATCH
        with torch.no_grad():
            want = reference(x[start:end]).numpy()
        (got,) = session.run(None, {"image": x[start:end].numpy()})
        assert np.max(np.abs(got - want)) <= PARITY_RTOL * max(1.0, float(np.abs(want).max()))
        correct += int((got.argmax(axis=1) == data.test.labels[start:end].numpy()).sum())
    recorded = config.latest.metrics[f"test_accuracy_in_batches_of_{PAGE_BATCH}"]
    assert abs(recorded - correct / len(x)) < 1e-3
    # Alone, the last BatchNorm sees one value per feature: every digit gets the same answer.
    labels = data.test.labels.numpy()
    different = int(np.flatnonzero(labels != labels[0])[0])
    (one,) = session.run(None, {"image": x[:1].numpy()})
    (other,) = session.run(None, {"image": x[different : different + 1].numpy()})
    np.testing.assert_allclose(one, other, rtol=0, atol=1e-6)


def test_samples_file_is_the_test_split(built_repository: tuple) -> None:
    repository, _, _ = built_repository
    samples = DigitSamples.model_validate_json((repository / SAMPLES_PATH).read_bytes())
    test = load_digits_split().test
    assert samples.scale == MAX_INTENSITY
    assert samples.labels == [str(int(label)) for label in test.labels]
    images = torch.tensor(samples.images, dtype=torch.float32).reshape(-1, 8, 8)
    assert torch.equal(images / samples.scale, test.images)  # exactly: k/16 is exact


def test_rebuild_uses_checkpoints_and_is_reproducible(
    built_repository: tuple, tmp_path: Path
) -> None:
    repository, checkpoints, _ = built_repository
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    again = tmp_path / "again"
    result = subprocess.run(
        [sys.executable, "-m", "export", "build", "--repository", str(again),
         "--checkpoints", str(checkpoints), "--models", "digits_cnn"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training" not in result.stderr  # the checkpoint was used
    # The same checkpoint exports to the same bytes: builds are reproducible.
    assert sha256_file(again / "digits_cnn" / "1" / "model.onnx") == sha256_file(
        repository / "digits_cnn" / "1" / "model.onnx"
    )
    skipped = subprocess.run(
        [sys.executable, "-m", "export", "build", "--repository", str(again),
         "--checkpoints", str(checkpoints), "--models", "digits_cnn", "--skip-existing"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert skipped.returncode == 0 and "skipped" in skipped.stderr


def test_batchstats_builds_alone_and_is_skipped_when_present(
    built_repository: tuple, tmp_path: Path
) -> None:
    _, checkpoints, _ = built_repository
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    again = tmp_path / "again"
    command = [sys.executable, "-m", "export", "build", "--repository", str(again),
               "--checkpoints", str(checkpoints), "--models", BATCHSTATS]  # fmt: skip
    built = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert built.returncode == 0, built.stderr[-2000:]
    assert [c.name for c in list_models(again)] == [BATCHSTATS]
    files = [again / BATCHSTATS / "1" / "model.onnx", again / SAMPLES_PATH]
    before = [(f.stat().st_mtime_ns, sha256_file(f)) for f in files]
    skipped = subprocess.run(
        [*command, "--skip-existing"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=env,
    )  # fmt: skip
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert f"[{BATCHSTATS}] already in" in skipped.stderr
    assert "[samples] already in" in skipped.stderr
    assert [(f.stat().st_mtime_ns, sha256_file(f)) for f in files] == before


def test_unknown_default_model_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "export", "build", "--repository", str(tmp_path),
         "--models", "nope"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 2
    assert "unknown model" in result.stderr and "digits_cnn" in result.stderr
    assert "Traceback" not in result.stderr
