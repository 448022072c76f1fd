"""A BatchNorm model exported with batch statistics: what it computes in training mode.

The web page shows the train-vs-inference difference computed by the service itself, so
the service needs a model that normalizes with the statistics of the batch it is given: the
same trained weights as the served eval-mode model, every BatchNorm using the batch's mean
and biased variance (running statistics neither used nor updated), Dropout off.

torch would export a training-mode BatchNorm as a ``BatchNormalization`` node with
``training_mode=1``, which ``export_onnx`` refuses, rightly, for a model meant to predict.
This is a separate, explicit path: each BatchNorm is replaced by ``BatchStatsNorm``, which
writes the steps out (the file holds ReduceMean, Sub, Mul, Sqrt, Div, no BatchNormalization),
nothing is folded (folding bakes in the running statistics), and the file is held against
torch's own training-mode BatchNorm forward at batch sizes of 2 and more. The repository
marks the result ``batch_dependent``, so the service runs each request as its own batch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from export.to_onnx import ExportError, ExportReport, export_onnx

# Batch statistics need 2 or more values per channel for torch (it refuses one in training);
# 32 is the page's batch.
PARITY_BATCHES = (2, 7, 32, 64)


class BatchStatsNorm(nn.Module):
    """``y = (x − mean) / √(var + ε) · γ + β`` per channel, with the mean and the biased
    variance of ``x`` over every axis but the channel axis 1: BatchNorm's training-mode
    normalization without its bookkeeping (nothing is updated).

    Written out rather than reusing ``models.norms.ReferenceBatchNorm``: that one computes in
    float64 (Cast nodes in the file), updates running statistics in training mode and refuses
    one value per channel. This one accepts it, as the page needs for a batch of 1 after a
    linear layer: the variance is then 0 and the output is β whatever the input.
    """

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        n = bn.num_features
        weight = bn.weight.detach().clone() if bn.weight is not None else torch.ones(n)
        bias = bn.bias.detach().clone() if bn.bias is not None else torch.zeros(n)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.eps = bn.eps

    def forward(self, x: Tensor) -> Tensor:
        dims = (0, *range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        centered = x - mean
        variance = (centered * centered).mean(dim=dims, keepdim=True)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        scale = self.weight.reshape(shape) / torch.sqrt(variance + self.eps)
        return centered * scale + self.bias.reshape(shape)


def with_batch_statistics(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` (Dropout off) whose BatchNorms are ``BatchStatsNorm``;
    ``model`` is untouched."""
    explicit = copy.deepcopy(model).eval()
    replaced = 0
    for parent in list(explicit.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm):
                setattr(parent, name, BatchStatsNorm(child))
                replaced += 1
    if not replaced:
        raise ExportError(
            f"{type(model).__name__} has no BatchNorm: with or without batch statistics it "
            "computes the same thing; export it with export_onnx"
        )
    return explicit


def torch_batch_statistics(model: nn.Module) -> nn.Module:
    """torch's own forward for the same function: a copy whose BatchNorms run in training
    mode and everything else (Dropout) in eval mode."""
    reference = copy.deepcopy(model).eval()
    for module in reference.modules():
        if isinstance(module, _BatchNorm):
            module.train()
            # Without tracking, a training-mode BatchNorm normalizes with the batch's
            # statistics and leaves the running ones alone.
            module.track_running_stats = False
    return reference


def export_batch_statistics(
    model: nn.Module,
    samples: Tensor,
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    labels: Sequence[str] | None = None,
    source: str = "",
    metadata: Mapping[str, str] | None = None,
) -> ExportReport:
    """Export ``model`` with batch statistics to ``path``; parity against torch's
    training-mode BatchNorm on random batches of ``PARITY_BATCHES`` rows and on ``samples``."""
    if samples.shape[0] < 2:
        raise ExportError("batch statistics need samples of at least 2 rows for the parity check")
    report = export_onnx(
        with_batch_statistics(model),
        samples[:8],
        path,
        input_names=input_names,
        output_names=output_names,
        samples=samples,
        parity_batches=PARITY_BATCHES,
        parity_reference=torch_batch_statistics(model),
        labels=labels,
        source=source,
        metadata={"normserve.batch_dependent": "true", **(metadata or {})},
    )
    if report.batchnorm_nodes:
        raise ExportError(
            f"{report.batchnorm_nodes} BatchNormalization node(s) in the batch-statistics "
            "export: every BatchNorm should have been written out"
        )
    return report


def accuracy_in_batches(model: nn.Module, images: Tensor, labels: Tensor, batch: int) -> float:
    """Accuracy of ``model`` with batch statistics on consecutive batches of ``batch`` rows
    (torch's forward; a last batch of one row joins the one before it)."""
    reference = torch_batch_statistics(model)
    starts = list(range(0, len(images), batch))
    if len(starts) > 1 and len(images) - starts[-1] < 2:
        starts.pop()
    bounds = [*starts[1:], len(images)]
    correct = 0
    with torch.no_grad():
        for start, end in zip(starts, bounds, strict=True):
            predicted = reference(images[start:end]).argmax(dim=1)
            correct += int((predicted == labels[start:end]).sum())
    return correct / len(images)
