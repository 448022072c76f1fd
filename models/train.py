"""Deterministic training of the default models on the digits split, with progress.

Same seed, same split, same thread count → bit-identical weights: the generator that
shuffles the batches is seeded, weights are initialised under ``torch.manual_seed``, and
training runs on a fixed number of threads (``TRAIN_THREADS``), because CPU reductions may
sum in a different order with a different thread count. The epoch with the best validation
accuracy is kept; the test split is only evaluated at the end.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from models import ModelSpec
from models.data import Digits, Split, load_digits_split
from models.sequence_data import resample_rows

# Two threads: fast on the 2-core machines this project targets, and the same on bigger
# machines (which would otherwise pick another reduction order).
TRAIN_THREADS = 2

Progress = Callable[[str], None]


def _print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    validation_loss: float
    validation_accuracy: float


@dataclass
class TrainResult:
    model: nn.Module
    best_epoch: int
    test_accuracy: float
    seconds: float
    history: list[EpochStats] = field(default_factory=list)


def shape_for(spec: ModelSpec, images: torch.Tensor) -> torch.Tensor:
    """Digits [N, 8, 8] reshaped to the model's input shape (per-sample ``spec.input_shape``)."""
    return images.reshape(images.shape[0], *spec.input_shape)


@torch.no_grad()
def evaluate(model: nn.Module, spec: ModelSpec, split: Split) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``split``, in eval mode.

    The model's mode is restored afterwards, so calling this mid-training is safe.
    """
    was_training = model.training
    model.eval()
    try:
        logits = model(shape_for(spec, split.images))
        loss = F.cross_entropy(logits, split.labels).item()
        accuracy = (logits.argmax(dim=1) == split.labels).float().mean().item()
    finally:
        model.train(was_training)
    return loss, accuracy


@contextmanager
def deterministic(threads: int = TRAIN_THREADS) -> Iterator[None]:
    """Deterministic kernels on a fixed thread count; the previous settings come back after."""
    previous_threads = torch.get_num_threads()
    previous_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_det)
        torch.set_num_threads(previous_threads)


def train(
    spec: ModelSpec,
    data: Digits | None = None,
    *,
    model: nn.Module | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    progress: Progress | None = _print_progress,
) -> TrainResult:
    """Train ``spec``'s model (or ``model``, e.g. a variant for the behaviour report).

    Returns the model in eval mode with the weights of its best validation epoch.
    """
    recipe = spec.recipe
    epochs = recipe.epochs if epochs is None else epochs
    lr = recipe.lr if lr is None else lr
    seed = recipe.seed if seed is None else seed
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    data = load_digits_split() if data is None else data
    started = time.perf_counter()
    with deterministic():
        torch.manual_seed(seed)
        net = spec.build() if model is None else model
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=recipe.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=lr,
            epochs=epochs,
            steps_per_epoch=-(-len(data.train) // recipe.batch_size),
        )
        shuffle = torch.Generator().manual_seed(seed)
        # Its own generator, so models without lengths draw the same batches as before.
        lengths = torch.Generator().manual_seed(seed)
        x_train = shape_for(spec, data.train.images)
        history: list[EpochStats] = []
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        for epoch in range(1, epochs + 1):
            net.train()
            order = torch.randperm(len(data.train), generator=shuffle)
            total_loss = 0.0
            correct = 0
            for start in range(0, len(order), recipe.batch_size):
                index = order[start : start + recipe.batch_size]
                if len(index) < 2:
                    # BatchNorm cannot normalize a batch of one sample in train mode.
                    continue
                x = x_train[index]
                if recipe.lengths is not None:
                    low, high = recipe.lengths
                    steps = int(torch.randint(low, high + 1, (1,), generator=lengths))
                    x = resample_rows(data.train.images[index], steps)
                logits = net(x)
                loss = F.cross_entropy(logits, data.train.labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total_loss += loss.item() * len(index)
                correct += int((logits.argmax(dim=1) == data.train.labels[index]).sum())
            val_loss, val_acc = evaluate(net, spec, data.validation)
            stats = EpochStats(
                epoch, total_loss / len(order), correct / len(order), val_loss, val_acc
            )
            history.append(stats)
            if best is None or val_acc > best[0]:
                best = (val_acc, epoch, copy.deepcopy(net.state_dict()))
            if progress is not None:
                progress(
                    f"[{spec.name}] epoch {epoch:>2}/{epochs}  loss {stats.train_loss:.4f}  "
                    f"val loss {val_loss:.4f}  val acc {val_acc:.2%}  "
                    f"({time.perf_counter() - started:.1f} s)"
                )
        if best is None:  # unreachable with epochs >= 1; keeps the type checker honest
            raise RuntimeError("no epoch ran")
        net.load_state_dict(best[2])
        net.eval()
        _, test_acc = evaluate(net, spec, data.test)
    seconds = time.perf_counter() - started
    if progress is not None:
        progress(
            f"[{spec.name}] best epoch {best[1]} (val acc {best[0]:.2%}), "
            f"test acc {test_acc:.2%}, {seconds:.1f} s"
        )
    return TrainResult(net, best[1], test_acc, seconds, history)
