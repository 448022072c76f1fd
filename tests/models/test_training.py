"""The digits split, the registry and deterministic training."""

from __future__ import annotations

import torch

from models import REGISTRY
from models.data import NUM_CLASSES, load_digits_split
from models.train import train

DIGITS_TOTAL = 1797


def test_split_is_fixed_stratified_and_disjoint() -> None:
    a, b = load_digits_split(), load_digits_split()
    sizes = [len(a.train), len(a.validation), len(a.test)]
    assert sum(sizes) == DIGITS_TOTAL
    assert sizes == [1078, 359, 360]
    assert torch.equal(a.test.images, b.test.images)
    assert torch.equal(a.train.labels, b.train.labels)
    # Stratified: every class is in every split, in near-equal proportion.
    for split in (a.train, a.validation, a.test):
        counts = torch.bincount(split.labels, minlength=NUM_CLASSES).float()
        assert counts.min() / counts.max() > 0.9
    # Disjoint: no test image also appears in train (digits has no exact duplicates across
    # these splits with this seed).
    train_rows = {tuple(x.flatten().tolist()) for x in a.train.images}
    assert not any(tuple(x.flatten().tolist()) in train_rows for x in a.test.images)
    assert float(a.train.images.min()) >= 0.0 and float(a.train.images.max()) <= 1.0


def test_another_seed_gives_another_split() -> None:
    assert not torch.equal(load_digits_split(0).test.labels, load_digits_split(1).test.labels)


def test_registry_models_take_their_input_spec() -> None:
    for spec in REGISTRY.values():
        model = spec.build().eval()
        # A dynamic (-1) axis: any length, here 5.
        out = model(torch.rand(3, *(5 if n == -1 else n for n in spec.input_shape)))
        assert out.shape == (3, len(spec.labels)), spec.name
        assert spec.input_name and spec.output_name


def test_registry_has_the_three_kinds_of_norm() -> None:
    kinds = {
        name: {type(m).__name__ for m in spec.build().modules()} for name, spec in REGISTRY.items()
    }
    assert {"BatchNorm2d", "BatchNorm1d", "Conv2d"} <= kinds["digits_cnn"]
    assert "LayerNorm" in kinds["digits_transformer"]
    assert "LayerNorm" in kinds["digits_recurrent"] and "LayerNorm" in kinds["digits_sequence"]
    served_layernorm = ("digits_transformer", "digits_recurrent", "digits_sequence")
    assert not any("BatchNorm" in k for name in served_layernorm for k in kinds[name])


def test_training_is_deterministic_and_learns() -> None:
    spec = REGISTRY["digits_cnn"]
    lines: list[str] = []
    threads = torch.get_num_threads()
    first = train(spec, epochs=2, progress=lines.append)
    second = train(spec, epochs=2, progress=None)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    # Progress: one line per epoch plus a summary.
    assert len(lines) == 3 and "epoch  1/2" in lines[0] and "test acc" in lines[-1]
    assert first.test_accuracy > 0.8  # two epochs already learn most digits
    assert not first.model.training
    assert torch.get_num_threads() == threads  # training's own thread setting is undone


def test_other_seed_gives_other_weights() -> None:
    spec = REGISTRY["digits_cnn"]
    a = train(spec, epochs=1, seed=0, progress=None).model.state_dict()
    b = train(spec, epochs=1, seed=1, progress=None).model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
