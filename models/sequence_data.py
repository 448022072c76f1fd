"""The digits read as sequences of rows of varying count: resampling, lengths, padding.

An 8x8 digit becomes a sequence of ``T`` rows of 8 pixels by linear interpolation along its
rows: row ``j`` of the sequence lies at position ``j * 7 / (T - 1)`` of the image (the first
and last rows stay the image's own), so ``T = 8`` is the image itself, a shorter sequence
skips between rows and a longer one adds rows in between. The digit is the same at every
length, only the number of steps a recurrent model takes to read it changes: accuracy
versus length then isolates what the model does with a length it has or has not seen.

Training draws one length per batch from ``TRAIN_LENGTHS`` (models/train.py): every
training batch is of equal length, so BatchNorm's per-step statistics never see a padded
step while training, and the padding experiments of the behaviour report measure padding
on its own. Lengths are drawn from a seeded generator: the same seed gives the same
sequences. Same train/validation/test split as models/data.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.data import IMAGE_SIDE

# Inclusive range of the training lengths; BatchNorm's per-step statistics exist up to the top.
TRAIN_LENGTHS = (4, 12)
MAX_TRAIN_LENGTH = TRAIN_LENGTHS[1]
# The lengths the report evaluates: inside the training range and up to twice beyond it.
EVAL_LENGTHS = tuple(range(2, 2 * MAX_TRAIN_LENGTH + 1))
FEATURES = IMAGE_SIDE  # pixels per row: every step's input size


def resample_rows(images: torch.Tensor, length: int) -> torch.Tensor:
    """Images [N, R, F] (R >= 2) as sequences [N, length, F] of linearly interpolated rows."""
    rows = images.shape[1]
    if length < 2 or rows < 2:
        raise ValueError(f"resampling needs at least 2 rows in and out, got {rows} -> {length}")
    # float64 positions: integer positions stay exact, so length == rows is the identity.
    position = torch.linspace(0, rows - 1, length, dtype=torch.float64)
    below = position.floor().long().clamp(max=rows - 2)
    weight = (position - below).to(images.dtype)[None, :, None]
    return images[:, below] * (1 - weight) + images[:, below + 1] * weight


def random_lengths(
    count: int, generator: torch.Generator, lengths: tuple[int, int] = TRAIN_LENGTHS
) -> torch.Tensor:
    """``count`` lengths drawn uniformly from the inclusive range ``lengths`` (int64)."""
    low, high = lengths
    return torch.randint(low, high + 1, (count,), generator=generator)


def as_sequences(images: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """Each image [R, F] of ``images`` resampled to its own length: a list of [T_i, F]."""
    return [
        resample_rows(image[None], int(length))[0]
        for image, length in zip(images, lengths, strict=True)
    ]


def pad_sequences(sequences: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded [N, T_max, F] with zeros after each sequence's end, lengths int64 [N])."""
    if not sequences:
        raise ValueError("no sequences to pad")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    padded = torch.nn.utils.rnn.pad_sequence(list(sequences), batch_first=True)
    return padded, lengths


def mixed_length_batch(
    images: torch.Tensor, generator: torch.Generator, lengths: tuple[int, int] = TRAIN_LENGTHS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` resampled to random lengths and padded: (padded, lengths)."""
    return pad_sequences(as_sequences(images, random_lengths(len(images), generator, lengths)))
