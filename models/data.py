"""The digits data set (scikit-learn's bundled ``load_digits``): load, split, scale.

1,797 grey 8x8 images of handwritten digits with integer intensities 0..16. They ship
inside scikit-learn, so training needs no download and gives the same data everywhere.

The split is fixed and stratified: 60 % train, 20 % validation, 20 % test, drawn with
``SPLIT_SEED``. Models receive intensities scaled to [0, 1] (``pixels / 16``): the same
scale a client sends over HTTP, so nothing else has to be known to call a served model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SPLIT_SEED = 0
TRAIN_FRACTION = 0.6
VALIDATION_FRACTION = 0.2
MAX_INTENSITY = 16.0
IMAGE_SIDE = 8
NUM_CLASSES = 10
LABELS = [str(d) for d in range(NUM_CLASSES)]


@dataclass(frozen=True)
class Split:
    """Images as float32 [N, 8, 8] in [0, 1] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Digits:
    train: Split
    validation: Split
    test: Split


def load_digits_split(seed: int = SPLIT_SEED) -> Digits:
    """The fixed stratified train/validation/test split; identical for the same seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / MAX_INTENSITY
    labels = np.asarray(bunch.target, dtype=np.int64)
    holdout = 1.0 - TRAIN_FRACTION
    x_train, x_rest, y_train, y_rest = train_test_split(
        images, labels, test_size=holdout, stratify=labels, random_state=seed
    )
    # Validation and test split the hold-out evenly.
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))

    return Digits(split(x_train, y_train), split(x_val, y_val), split(x_test, y_test))
