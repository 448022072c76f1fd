"""``import torchvision`` beside the CPU torch: the export-time benchmark and the tests need it.

The torchvision 0.28.0 wheel that pairs with torch 2.13 is a CUDA build; beside the CPU torch
its compiled ``_C`` extension does not load, and its meta registrations then call
``register_fake("torchvision::nms")`` (and ``qnms``) unguarded, so ``import torchvision`` (and
``import timm``, which imports it) raises "operator torchvision::nms does not exist".
``import_torchvision`` first loads ``_C`` itself; only where that fails does it define the two
schemas the import needs in a ``torch.library.Library("torchvision", "FRAGMENT")``, with the
compiled ops' signature ``(Tensor dets, Tensor scores, float iou_threshold) -> Tensor``. They
get no kernel: classification and segmentation models never call NMS (a detection model
would, and would fail loudly).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

_schemas: torch.library.Library | None = None  # kept alive: the schemas live as long as it


def import_torchvision() -> ModuleType:
    """``torchvision``, importable beside the CPU torch (see the module docstring)."""
    global _schemas
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("torchvision is not installed: pip install -e '.[export,dev]'")
    if _schemas is None and not _has_nms():
        try:
            torch.ops.load_library(str(next(Path(spec.origin).parent.glob("_C*.so"))))
        except (OSError, StopIteration):
            _schemas = torch.library.Library("torchvision", "FRAGMENT")
            for op in ("nms", "qnms"):
                _schemas.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision  # type: ignore[no-any-return]


def _has_nms() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018 (the lookup is the test)
    except (AttributeError, RuntimeError):
        return False
    return True
