"""Folding real Hugging Face vision architectures that torch.fx cannot trace.

Tiny configurations with random initialization: nothing is downloaded. torch.fx's symbolic
tracing fails on each of them (data-dependent Python in their forward), which is why the fold
observes the data flow by running the model instead.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from benchmarks.torchvision_cpu import import_torchvision
from export import fold_batchnorm_with_report

# Set before transformers is imported: it reads the variable at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
if importlib.util.find_spec("torchvision") is not None:
    # transformers imports torchvision when it is installed; the CUDA wheel beside the CPU
    # torch needs its op schemas defined first (see benchmarks.torchvision_cpu).
    import_torchvision()
transformers = pytest.importorskip("transformers")

# Folded vs model.eval() logits: max|Δ| <= RTOL * max(1, max|logits|).
RTOL = 1e-5
# Logits this small would make the comparison vacuous (a lost BatchNorm would still pass).
MIN_LOGIT_MAGNITUDE = 1e-3
# Spread of the classifier weights: the library's init makes some heads (near) zero.
HEAD_STD = 0.5
IMAGE_SIDE = 64
BATCH = 3
SEED = 0


def resnet() -> nn.Module:
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck"
    )
    return transformers.ResNetForImageClassification(config)


def mobilenet_v2() -> nn.Module:
    config = transformers.MobileNetV2Config(image_size=IMAGE_SIDE, depth_multiplier=0.35)
    return transformers.MobileNetV2ForImageClassification(config)


def efficientnet() -> nn.Module:
    config = transformers.EfficientNetConfig(
        image_size=IMAGE_SIDE, width_coefficient=0.2, depth_coefficient=0.2, hidden_dim=256
    )
    return transformers.EfficientNetForImageClassification(config)


def regnet() -> nn.Module:
    config = transformers.RegNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8
    )
    return transformers.RegNetForImageClassification(config)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: Any = model(x)
    return out.logits


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(resnet, id="resnet"),
        pytest.param(mobilenet_v2, id="mobilenet_v2"),
        pytest.param(efficientnet, id="efficientnet"),
        pytest.param(regnet, id="regnet"),
    ],
)
def test_untraceable_hf_model_folds_every_batchnorm_without_example_input(
    build: Callable[[], nn.Module],
    randomize_bn: Callable[..., nn.Module],
    caller_snapshot: Callable[[nn.Module], Callable[[], None]],
) -> None:
    torch.manual_seed(SEED)
    model = randomize_bn(build(), SEED)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, HEAD_STD)
    model.train()
    bn_names = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    assert bn_names

    # ResNet, EfficientNet and RegNet branch on a traced value; MobileNetV2 calls int() on one.
    with pytest.raises((torch.fx.proxy.TraceError, TypeError)):
        torch.fx.symbolic_trace(model)

    assert_unchanged = caller_snapshot(model)
    folded, report = fold_batchnorm_with_report(model)
    assert_unchanged()

    assert report.kept == {}
    assert sorted(report.folded) == sorted(bn_names)
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())

    x = torch.randn(BATCH, model.config.num_channels, IMAGE_SIDE, IMAGE_SIDE)
    expected = logits(copy.deepcopy(model).eval(), x)
    actual = logits(folded, x)
    magnitude = float(expected.abs().max())
    assert magnitude > MIN_LOGIT_MAGNITUDE
    assert actual.shape == expected.shape
    error = float((actual.double() - expected.double()).abs().max())
    assert error <= RTOL * max(1.0, magnitude)
