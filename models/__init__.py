"""The project's default models and their registry: name → builder, input spec, labels.

The registry is the one place that says how a default model is called (input name, shape,
dtype), what its outputs mean (labels) and how it is trained, so that training, export and
the behaviour report agree without repeating it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from models.cnn import DigitsCNN
from models.data import IMAGE_SIDE, LABELS
from models.recurrent import RowLSTM
from models.sequence import SequenceLSTM
from models.sequence_data import FEATURES, MAX_TRAIN_LENGTH, TRAIN_LENGTHS
from models.transformer import RowTransformer


@dataclass(frozen=True)
class TrainRecipe:
    """Hyper-parameters of the deterministic training run (see models/train.py)."""

    epochs: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 1e-4
    seed: int = 0
    # Sequence models: every training batch is resampled to one length drawn from this
    # inclusive range (models/sequence_data.py), so no training batch is padded.
    lengths: tuple[int, int] | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    description: str
    input_name: str
    # Per-sample shape: the batch axis is not included; -1 marks a dynamic (sequence) axis.
    input_shape: tuple[int, ...]
    output_name: str = "logits"
    labels: list[str] = field(default_factory=lambda: list(LABELS))
    recipe: TrainRecipe = TrainRecipe(epochs=20, lr=3e-3)
    # A sequence model (a -1 in input_shape): the most steps a request may send, written to
    # config.json's max_shape when exported (export/build.py).
    max_length: int | None = None
    # The accuracy the held-out test split must reach (checked by the tests).
    min_test_accuracy: float = 0.95


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="digits_cnn",
            build=DigitsCNN,
            description=(
                "Conv-BatchNorm-ReLU CNN on 8x8 digits (BatchNorm folded into the convolutions "
                "and the hidden linear layer). Input: grey intensities in [0, 1], ink = 1."
            ),
            input_name="image",
            input_shape=(1, IMAGE_SIDE, IMAGE_SIDE),
            recipe=TrainRecipe(epochs=15, lr=3e-3),
            min_test_accuracy=0.97,
        ),
        ModelSpec(
            name="digits_transformer",
            build=RowTransformer,
            description=(
                "Pre-norm Transformer encoder (LayerNorm) reading the 8 rows of an 8x8 digit as "
                "a sequence. Input: grey intensities in [0, 1], ink = 1, shape [rows, pixels]."
            ),
            input_name="image",
            input_shape=(IMAGE_SIDE, IMAGE_SIDE),
            recipe=TrainRecipe(epochs=40, lr=2e-3),
        ),
        ModelSpec(
            name="digits_recurrent",
            build=RowLSTM,
            description=(
                "LSTM with LayerNorm on its gates and cell (Ba et al. 2016) reading the 8 rows of "
                "an 8x8 digit. Input: grey intensities in [0, 1], ink = 1, shape [rows, pixels]."
            ),
            input_name="image",
            input_shape=(IMAGE_SIDE, IMAGE_SIDE),
            recipe=TrainRecipe(epochs=30, lr=5e-3),
        ),
        ModelSpec(
            name="digits_sequence",
            build=SequenceLSTM,
            description=(
                "LSTM with LayerNorm on its gates and cell reading a digit as a sequence of any "
                "number of rows of 8 pixels (the 8x8 image resampled along its rows; trained on "
                f"{TRAIN_LENGTHS[0]} to {TRAIN_LENGTHS[1]} rows). Input: grey intensities in "
                "[0, 1], ink = 1, shape [rows, pixels]."
            ),
            input_name="image",
            input_shape=(-1, FEATURES),
            max_length=4 * MAX_TRAIN_LENGTH,
            recipe=TrainRecipe(epochs=15, lr=1e-2, lengths=TRAIN_LENGTHS),
        ),
    )
}

__all__ = ["REGISTRY", "ModelSpec", "TrainRecipe"]
