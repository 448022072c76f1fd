"""Real torchvision and timm architectures for the export tests: random init, no download.

Shared by the export tests (parity, folding): import it as ``real_models`` (tests/ is on
pytest's pythonpath, like ``tiny_onnx``).

torchvision (and timm, which imports it): the 0.28.0 wheel that pairs with torch 2.13 is a
CUDA build whose compiled ops do not load beside the CPU torch, and ``import torchvision`` then
raises "operator torchvision::nms does not exist". ``benchmarks.torchvision_cpu`` (shared with
the export-time benchmark) defines the ``nms`` and ``qnms`` op schemas that the import needs in
a ``torch.library.Library("torchvision", "FRAGMENT")`` before importing it, signature
``(Tensor dets, Tensor scores, float iou_threshold) -> Tensor``; classification and
segmentation models never call them.

Realistic statistics: BatchNorm's default running statistics (mean 0, variance 1) are far
from what a random-init deep network's layers see, and random ones make many deep models
answer nearly the same thing for every input, which makes any parity check weak.
``realistic_batchnorm`` measures them instead: it gives each BatchNorm a random affine map,
runs a few random batches in train mode with ``momentum=None`` (a true cumulative average),
then perturbs the statistics slightly, so a fold that ignores them still shows.
"""

from __future__ import annotations

import inspect
import os
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from benchmarks.torchvision_cpu import import_torchvision

SEED = 0
CALIBRATION_BATCHES = 3
CALIBRATION_BATCH_SIZE = 8
# The perturbation of measured statistics: variance ×U(0.8, 1.25), mean + 0.1·σ·N(0, 1).
VARIANCE_SPREAD = 1.25
MEAN_SHIFT = 0.1


def import_timm() -> ModuleType:
    """``timm``, offline: its factories never fetch weights here (``pretrained=False``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import_torchvision()  # timm imports torchvision
    import timm

    return timm


def torchvision_model(name: str, **kwargs: Any) -> nn.Module:
    """torchvision's ``name`` with random weights (seeded, backbone too), in eval mode."""
    torchvision = import_torchvision()
    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs.setdefault("weights_backbone", None)  # its default downloads ImageNet weights
    torch.manual_seed(SEED)
    model: nn.Module = builder(weights=None, **kwargs)
    return model.eval()


def timm_model(name: str, **kwargs: Any) -> nn.Module:
    """timm's ``name`` with random weights (seeded), in eval mode."""
    timm = import_timm()
    torch.manual_seed(SEED)
    model: nn.Module = timm.create_model(name, pretrained=False, **kwargs)
    return model.eval()


def realistic_batchnorm(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    seed: int = SEED,
    batches: int = CALIBRATION_BATCHES,
    batch_size: int = CALIBRATION_BATCH_SIZE,
) -> nn.Module:
    """Give every tracking BatchNorm of ``model`` a random affine map and the running
    statistics it really sees on N(0, 1) inputs of ``input_shape`` (no batch axis), slightly
    perturbed; returns ``model`` (changed in place) in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    with torch.no_grad():
        for bn in norms:
            if bn.affine:
                bn.weight.copy_(_uniform(bn.num_features, 0.5, 1.5, generator))
                bn.bias.copy_(_uniform(bn.num_features, -0.2, 0.2, generator))
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average of every batch seen
        model.train()
        try:
            for _ in range(batches):
                model(torch.randn((batch_size, *input_shape), generator=generator))
        finally:
            for bn, momentum in zip(norms, momenta, strict=True):
                bn.momentum = momentum
            model.eval()
        for bn in norms:
            assert bn.running_var is not None and bn.running_mean is not None
            n = bn.num_features
            spread = _uniform(n, 1 / VARIANCE_SPREAD, VARIANCE_SPREAD, generator)
            shift = MEAN_SHIFT * torch.randn(n, generator=generator) * bn.running_var.sqrt()
            bn.running_var.mul_(spread)
            bn.running_mean.add_(shift)
    return model


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high, generator=generator)
