"""Which modules are BatchNorms the fold understands, and what stands in their place after.

Plain ``torch.nn`` BatchNorms (and subclasses that keep ``_BatchNorm.forward``) compute the
eval-mode affine map ``y = (x − μ)·γ/√(σ²+ε) + β``. A subclass that overrides ``forward()``
computes something unknown and is refused, except the classes in ``KNOWN_NORMS``, whose
forward was read (timm 1.0, torchvision 0.28): the same affine map on the channel axis of a 4-D
input, then for some ``self.act(self.drop(x))``. They are matched by exact qualified class name,
so neither timm nor torchvision is imported here and a subclass of them stays unknown.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class KnownNorm:
    """How a known BatchNorm-like class differs from ``nn.BatchNorm2d``."""

    # Statistics and affine parameters are buffers it always uses (no train/eval switch).
    frozen: bool
    # After the affine map it applies ``self.drop`` then ``self.act`` (either may be absent).
    has_tail: bool
    # The only input rank its forward handles correctly.
    rank: int = 4


KNOWN_NORMS: dict[str, KnownNorm] = {
    # F.batch_norm(x, running stats, weight, bias, ..., eps), then drop, then act.
    "timm.layers.norm_act.BatchNormAct2d": KnownNorm(frozen=False, has_tail=True),
    # nn.SyncBatchNorm.forward (eval: F.batch_norm), then drop and act where set.
    "timm.layers.norm_act.SyncBatchNormAct": KnownNorm(frozen=False, has_tail=True),
    # x·w/√(var+ε) + (b − mean·w/√(var+ε)) from buffers, then drop, then act.
    "timm.layers.norm_act.FrozenBatchNormAct2d": KnownNorm(frozen=True, has_tail=True),
    "torchvision.ops.misc.FrozenBatchNorm2d": KnownNorm(frozen=True, has_tail=False),
}

# Modules that are the identity in eval mode (the fold works on an eval-mode copy).
_EVAL_IDENTITY: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)  # fmt: skip


def qualified_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def known_norm(module: nn.Module) -> KnownNorm | None:
    return KNOWN_NORMS.get(qualified_name(module))


def is_norm(module: nn.Module) -> bool:
    """A BatchNorm the fold reports on: folded, or kept with a reason."""
    return isinstance(module, _BatchNorm) or known_norm(module) is not None


def forward_reason(module: nn.Module) -> str | None:
    """Why the fold cannot know what ``module`` computes, or None."""
    if known_norm(module) is not None:
        return None
    forward = type(module).forward
    if forward is _BatchNorm.forward:
        return None
    if isinstance(module, nn.SyncBatchNorm) and forward is nn.SyncBatchNorm.forward:
        return None
    return f"overrides forward() ({type(module).__name__}), so its computation is unknown"


def statistics_reason(module: nn.Module) -> str | None:
    """Why ``module``'s eval output depends on the batch, or None."""
    known = known_norm(module)
    if known is not None and known.frozen:
        return None
    if (
        not getattr(module, "track_running_stats", False)
        or getattr(module, "running_mean", None) is None
        or getattr(module, "running_var", None) is None
    ):
        return (
            "tracks no running statistics (track_running_stats=False): its eval output "
            "depends on the batch, so it cannot be folded"
        )
    return None


def norm_tensors(module: nn.Module) -> list[torch.Tensor]:
    names = ("running_mean", "running_var", "weight", "bias")
    return [t for t in (getattr(module, n, None) for n in names) if isinstance(t, torch.Tensor)]


@dataclass(frozen=True)
class Affine:
    """The per-channel map ``y = x·scale + shift`` a BatchNorm applies, in float64."""

    scale: torch.Tensor
    shift: torch.Tensor


def norm_parameters(
    module: nn.Module,
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None, torch.Tensor | None]:
    """``(running_mean, running_var, eps, gamma, beta)`` of a BatchNorm the fold understands."""
    mean, var = module.running_mean, module.running_var
    assert isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)  # statistics_reason
    gamma = getattr(module, "weight", None)
    beta = getattr(module, "bias", None)
    return mean, var, float(module.eps), gamma, beta


def affine_of(module: nn.Module) -> Affine:
    return batchnorm_affine(*norm_parameters(module))


def batchnorm_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> Affine:
    """``s = γ/√(σ²+ε)`` and ``t = β − μ·s`` in float64 (γ = 1, β = 0 when absent)."""
    scale = torch.rsqrt(running_var.detach().to(torch.float64) + eps)
    if gamma is not None:
        scale = scale * gamma.detach().to(torch.float64)
    shift = -running_mean.detach().to(torch.float64) * scale
    if beta is not None:
        shift = shift + beta.detach().to(torch.float64)
    return Affine(scale, shift)


def tail_of(module: nn.Module) -> list[nn.Module]:
    """What ``module`` applies after its affine map, in order (empty for a plain BatchNorm)."""
    known = known_norm(module)
    if known is None or not known.has_tail:
        return []
    found = (getattr(module, "drop", None), getattr(module, "act", None))
    return [m for m in found if isinstance(m, nn.Module)]


def tail_reason(module: nn.Module) -> str | None:
    """Why ``module``'s output is not its affine map's output (an activation after it), or None."""
    active = [m for m in tail_of(module) if type(m) not in _EVAL_IDENTITY]
    if not active:
        return None
    names = ", ".join(type(m).__name__ for m in active)
    return f"applies {names} after normalizing"


class FoldedBatchNorm(nn.Module):
    """What stands where a folded BatchNorm stood: its tail (drop, act) or the identity.

    The configuration attributes stay (``num_features``, ``eps``...), so code that reads them
    keeps working and ``print(model)`` shows where each BatchNorm went. A known BatchNorm with
    an activation keeps it as ``drop`` and ``act``, at the same names as before.
    """

    def __init__(self, bn: nn.Module, folded_into: list[str], how: str = "") -> None:
        super().__init__()
        self.num_features = getattr(bn, "num_features", None) or int(bn.running_mean.numel())
        self.eps = bn.eps
        self.momentum = getattr(bn, "momentum", None)
        self.affine = getattr(bn, "affine", True)
        self.track_running_stats = getattr(bn, "track_running_stats", True)
        self.folded_into = list(folded_into)
        self.how = how
        known = known_norm(bn)
        self.drop: nn.Module | None = getattr(bn, "drop", None) if known else None
        self.act: nn.Module | None = getattr(bn, "act", None) if known else None
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop is not None:
            x = self.drop(x)
        if self.act is not None:
            x = self.act(x)
        return x

    def extra_repr(self) -> str:
        how = f" ({self.how})" if self.how else ""
        return f"{self.num_features}, folded into {', '.join(self.folded_into)}{how}"


class MergedBranch(nn.Module):
    """A parallel branch whose computation moved into another branch's convolution.

    It returns a zero scalar, so the sum it fed (``main + branch``) computes ``main + 0``,
    which is ``main`` exactly.
    """

    def __init__(self, merged_into: str, like: torch.Tensor) -> None:
        super().__init__()
        self.merged_into = merged_into
        self.register_buffer("zero", torch.zeros((), dtype=like.dtype, device=like.device))
        self.eval()

    def forward(self, *args: object) -> torch.Tensor:
        return self.zero

    def extra_repr(self) -> str:
        return f"merged into {self.merged_into}"
