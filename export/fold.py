"""BatchNorm folding that works on real models, not only ``nn.Sequential``.

An eval-mode BatchNorm is a per-channel affine map ``y = x·s + t`` with ``s = γ/√(σ²+ε)``,
``t = β − μ·s``. It can move into a neighbouring layer's weights exactly in three cases:

- *after* a convolution or linear layer whose output nothing else reads (``fold_weights``),
  also through reshapes that keep the layer's feature axis as the BatchNorm's axis (LeViT's
  ``bn(linear(x).flatten(0, 1))``), average pooling, and channel concatenations of several
  such outputs (a slice of the BatchNorm into each: MixNet);
- *before* a convolution without zero padding or a linear layer that alone reads its output
  (``fold_weights_before``: MaxViT's and CoAtNet's MBConv pre-norm; DenseNet's cannot, a ReLU
  sits between);
- *beside* convolutions of the same input in a sum (RepVGG's ``conv3x3 + conv1x1 + bn(x)``):
  the branches merge into one convolution (``export.fold_reparam``).

Which BatchNorm reads which layer's output is a property of the data flow, not of the module
tree, so it is observed by running the model once on an example input (``export.fold_trace``);
decisions are in ``export.fold_plans``. This needs no symbolic tracing (which fails on models
with data-dependent Python, such as Hugging Face's vision models) and catches what
module-pattern fusers get wrong: a layer output read twice, a layer called at two places,
one BatchNorm shared by several layers, weights used outside their module.

Besides ``torch.nn``'s BatchNorms, the known classes of ``export.fold_norms`` fold (timm's
``BatchNormAct2d``, torchvision's ``FrozenBatchNorm2d``...), keeping their activation. A
BatchNorm is folded only when every one of its calls is safe; otherwise it stays, in eval
mode, and the reason is reported. The caller's model is never changed: all work happens on a
deep copy, and the weight arithmetic runs in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from export.fold_norms import (
    FoldedBatchNorm,
    MergedBranch,
    batchnorm_affine,
    is_norm,
    norm_parameters,
)
from export.fold_plans import Plan, plan
from export.fold_reparam import Merge, find_merges, merged_weights
from export.fold_trace import (
    CONV,
    CONV_T,
    FOLD_TARGETS,
    ExampleInput,
    FoldError,
    Trace,
    call_model,
    spatial_dims,
    trace_model,
)

__all__ = [
    "FOLD_TARGETS",
    "ExampleInput",
    "FoldError",
    "FoldReport",
    "FoldedBatchNorm",
    "fold_batchnorm",
    "fold_batchnorm_with_report",
    "fold_weights",
    "fold_weights_before",
    "guess_example_input",
]

# A merge is checked by running the merged model once: a correct merge moves the output by
# float32 rounding (~1e-6 relative), a model whose code reads a merged branch's shape by O(1).
_MERGE_CHECK_RTOL = 1e-3


@dataclass
class FoldReport:
    """What ``fold_batchnorm`` did: BatchNorm name → the layers it went into, or why it stayed."""

    folded: dict[str, list[str]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    # Folded BatchNorm name -> "after" (into the layers whose output it read), "before" (into
    # the layers that read its output) or "merged" (into a parallel branch's convolution).
    how: dict[str, str] = field(default_factory=dict)
    # Convolution name -> the parallel convolution that now computes it too.
    merged: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.folded) + len(self.kept)

    def summary(self) -> str:
        return f"BN folded {len(self.folded)}/{self.total}"


def fold_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``(W', b')`` of the layer with the eval-mode BatchNorm after it folded in.

    ``W' = W·s`` per output channel and ``b' = (b − μ)·s + β`` with ``s = γ/√(σ²+ε)``.
    Output channels are axis 0 of a convolution or linear weight ``[out, in/g, *k]``; a
    transposed convolution's weight is ``[in, out/g, *k]``, where output channel
    ``j + (out/g)·group`` lives at ``[group·in/g : (group+1)·in/g, j]``. The arithmetic runs
    in float64 and the results come back in the weight's dtype, so tiny variances and
    half-precision layers lose nothing to the fold itself.
    """
    dtype = weight.dtype
    w = weight.detach().to(torch.float64)
    affine = batchnorm_affine(running_mean, running_var, eps, gamma, beta)
    scale, shift = affine.scale, affine.shift
    b = torch.zeros_like(scale) if bias is None else bias.detach().to(torch.float64)
    if transposed:
        in_channels, out_per_group = w.shape[:2]
        kernel = w.shape[2:]
        grouped = w.reshape(groups, in_channels // groups, out_per_group, *kernel)
        factor = scale.reshape(groups, 1, out_per_group, *([1] * len(kernel)))
        w = (grouped * factor).reshape(w.shape)
    else:
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    return w.to(dtype), (b * scale + shift).to(dtype)


def fold_weights_before(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    *,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``(W', b')`` of a layer with the eval-mode BatchNorm before it folded in.

    The layer sees ``x·s + t`` per input channel, so ``W' = W·diag(s)`` over input channels
    and ``b' = b + Σ W·t`` (summed over input channels and kernel taps). A convolution weight
    ``[out, in/g, *k]`` gives output channel ``o`` the inputs of group ``o // (out/g)``; a
    linear weight is ``[out, in]``. Exact only where every tap reads a real input (no zero
    padding): a padded tap would add ``W·t`` that the unfolded layer never saw. Float64
    arithmetic, results in the weight's dtype.
    """
    dtype = weight.dtype
    w = weight.detach().to(torch.float64)
    affine = batchnorm_affine(running_mean, running_var, eps, gamma, beta)
    out_channels, in_per_group = w.shape[:2]
    kernel = w.shape[2:]
    grouped = w.reshape(groups, out_channels // groups, in_per_group, *kernel)
    per_input = (groups, 1, in_per_group, *([1] * len(kernel)))
    new_weight = (grouped * affine.scale.reshape(per_input)).reshape(w.shape)
    shifted = (grouped * affine.shift.reshape(per_input)).sum(dim=tuple(range(2, grouped.dim())))
    shifted = shifted.reshape(out_channels)
    b = torch.zeros_like(shifted) if bias is None else bias.detach().to(torch.float64)
    return new_weight.to(dtype), (b + shifted).to(dtype)


def fold_batchnorm(model: nn.Module, example_input: ExampleInput | None = None) -> nn.Module:
    """A new eval-mode module computing what ``model.eval()`` computes, foldable BNs folded.

    ``example_input`` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments) is what the model is run on once to see its data flow; without it one is
    derived from the model (see ``guess_example_input``). The caller's model is unchanged.
    """
    return fold_batchnorm_with_report(model, example_input)[0]


def fold_batchnorm_with_report(
    model: nn.Module, example_input: ExampleInput | None = None
) -> tuple[nn.Module, FoldReport]:
    """``fold_batchnorm`` plus the report of what was folded and why the rest was kept."""
    if isinstance(model, torch.jit.ScriptModule):
        raise FoldError("TorchScript modules cannot be folded: pass the original nn.Module")
    folded = copy.deepcopy(model).eval()
    report = FoldReport()
    norms = _named_norms(folded)
    if not norms:
        return folded, report
    if example_input is None:
        example_input = guess_example_input(folded)
    trace = trace_model(folded, example_input)
    names = _module_names(folded)
    plans, reasons = _plan_all(norms, trace, names, report)
    merges, merge_reasons = find_merges(trace, plans, {id(n): n for n in norms.values()})
    for name, norm in norms.items():
        chosen = plans.get(id(norm))
        if chosen is not None:
            _apply_plan(folded, name, chosen, report)
        elif id(norm) in merge_reasons:
            reasons[name] = f"{reasons[name]}, and {merge_reasons[id(norm)]}"
    applied = _apply_merges(folded, merges, names, example_input, trace.output)
    _report_merges(report, merges, applied, norms, names, reasons)
    for name, reason in reasons.items():
        if name not in report.folded:
            report.kept[name] = f"BatchNorm '{name}' {reason}; kept as an eval-mode BatchNorm"
    return folded, report


def _plan_all(
    norms: Mapping[str, nn.Module], trace: Trace, names: Mapping[int, str], report: FoldReport
) -> tuple[dict[int, Plan], dict[str, str]]:
    """Each BatchNorm's plan (by id), or why it has none (by name); plans go into ``report``."""
    plans: dict[int, Plan] = {}
    reasons: dict[str, str] = {}
    for name, norm in norms.items():
        decided = plan(norm, trace, names)
        if isinstance(decided, str):
            reasons[name] = decided
            continue
        plans[id(norm)] = decided
        report.folded[name] = [names[id(layer)] for layer in decided.layers]
        report.how[name] = "before" if decided.before else "after"
    return plans, reasons


def _apply_plan(model: nn.Module, name: str, chosen: Plan, report: FoldReport) -> None:
    for i, layer in enumerate(chosen.layers):
        part = chosen.channels[i] if chosen.channels is not None else slice(None)
        _fold_into(layer, chosen.norm, before=chosen.before, channels=part)
    how = "which read its output" if chosen.before else ""
    _replace(model, chosen.norm, FoldedBatchNorm(chosen.norm, report.folded[name], how))


def _report_merges(
    report: FoldReport,
    merges: list[Merge],
    applied: list[Merge],
    norms: Mapping[str, nn.Module],
    names: Mapping[int, str],
    reasons: dict[str, str],
) -> None:
    by_id = {id(norm): name for name, norm in norms.items()}
    for merge in applied:
        into = names[id(merge.host or merge.main)]
        for conv in (merge.main, *merge.convs):
            if conv is not merge.host and names[id(conv)] != into:
                report.merged[names[id(conv)]] = into
        for norm in merge.norms:
            report.folded[by_id[id(norm)]] = [into]
            report.how[by_id[id(norm)]] = "merged"
    if merges and not applied:
        for norm in (n for merge in merges for n in merge.norms):
            reasons[by_id[id(norm)]] += (
                ", and merging the sum it feeds into one convolution changed the model's "
                "output on the example input (its code reads a branch itself), so no sum "
                "was merged"
            )


# ---------------------------------------------------------------------------- rewriting


def _fold_into(
    layer: nn.Module, norm: nn.Module, *, before: bool, channels: slice = slice(None)
) -> None:
    """Fold ``norm``'s ``channels`` into ``layer`` (all of them unless it makes only a part)."""
    mean, var, eps, gamma, beta = norm_parameters(norm)
    mean, var = mean[channels], var[channels]
    gamma = None if gamma is None else gamma[channels]
    beta = None if beta is None else beta[channels]
    groups = getattr(layer, "groups", 1)
    if before:
        weight, bias = fold_weights_before(
            layer.weight, layer.bias, mean, var, eps, gamma, beta, groups=groups
        )
    else:
        weight, bias = fold_weights(
            layer.weight, layer.bias, mean, var, eps, gamma, beta,
            transposed=isinstance(layer, CONV_T), groups=groups,
        )  # fmt: skip
    layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)


def _apply_merges(
    model: nn.Module,
    merges: list[Merge],
    names: Mapping[int, str],
    example_input: ExampleInput,
    expected: Any,
) -> list[Merge]:
    """Merge the branches; returns the merges made (all of ``merges``, or none).

    The merged model is run once on the example input: where its code read a merged branch's
    shape (which is now a scalar), the output changes and every merge is undone.
    """
    if not merges:
        return []
    undo: list[tuple[nn.Module, str, nn.Module]] = []
    old_weights: list[tuple[nn.Module, nn.Parameter, nn.Parameter | None]] = []
    for merge in merges:
        main, into = merge.main, names[id(merge.host or merge.main)]
        weight, bias = merged_weights(merge)
        if merge.host is not None:
            # The merged conv runs at the host's place (see Merge.host); main is a branch.
            host, main = main, copy.deepcopy(main)
            undo += _replace(model, merge.host, main)
            undo += _replace(model, host, MergedBranch(into, weight))
        old_weights.append((main, main.weight, main.bias))
        main.weight = nn.Parameter(weight, requires_grad=main.weight.requires_grad)
        main.bias = nn.Parameter(bias, requires_grad=main.weight.requires_grad)
        for branch in (*merge.convs, *merge.norms):
            if branch is not merge.host:
                undo += _replace(model, branch, MergedBranch(into, weight))
    if _same_outputs(model, example_input, expected):
        return merges
    for parent, child_name, child in undo:
        setattr(parent, child_name, child)
    for main, old_weight, old_bias in old_weights:
        main.weight, main.bias = old_weight, old_bias
    return []


def _same_outputs(model: nn.Module, example_input: ExampleInput, expected: Any) -> bool:
    try:
        with torch.no_grad():
            actual = call_model(model, example_input)
    except Exception:
        return False
    want = [t for t in tree_leaves(expected) if isinstance(t, torch.Tensor)]
    got = [t for t in tree_leaves(actual) if isinstance(t, torch.Tensor)]
    if len(want) != len(got):
        return False
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            return False
        if b.is_floating_point():
            bound = _MERGE_CHECK_RTOL * max(1.0, float(b.abs().max())) if b.numel() else 0.0
            if b.numel() and float((a.double() - b.double()).abs().max()) > bound:
                return False
        elif not torch.equal(a, b):
            return False
    return True


def _named_norms(model: nn.Module) -> dict[str, nn.Module]:
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if is_norm(module) and id(module) not in seen:
            if (
                isinstance(module, nn.modules.lazy.LazyModuleMixin)
                and module.has_uninitialized_params()
            ):
                raise FoldError(
                    f"BatchNorm '{name}' is lazy and uninitialized: run the model once first"
                )
            seen.add(id(module))
            found[name] = module
    return found


def _module_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name or type(model).__name__)
    return names


def _replace(
    model: nn.Module, old: nn.Module, new: nn.Module
) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put ``new`` at every place ``old`` is registered (a shared module has several);
    returns (parent, name, old) for each place."""
    replaced = []
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)
                replaced.append((parent, child_name, old))
    return replaced


# ---------------------------------------------------------------------------- inputs


def guess_example_input(model: nn.Module) -> torch.Tensor:
    """An input to run ``model`` on when the caller gave none.

    Hugging Face vision models declare ``config.num_channels`` and ``config.image_size``;
    otherwise the first convolution or linear layer (in registration order) gives the
    channel or feature count, with 32 positions per spatial axis. The batch is 2 so that
    nothing mistakes it for a single unbatched sample.
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    config = getattr(model, "config", None)
    channels = getattr(config, "num_channels", None)
    size = getattr(config, "image_size", None)
    if isinstance(channels, int) and size is not None:
        side = size if isinstance(size, int) else tuple(size)
        hw = (side, side) if isinstance(side, int) else side
        return torch.randn(2, channels, *hw, dtype=dtype)
    for module in model.modules():
        if isinstance(module, (*CONV, *CONV_T)):
            return torch.randn(2, module.in_channels, *[32] * spatial_dims(module), dtype=dtype)
        if isinstance(module, nn.Linear):
            return torch.randn(2, module.in_features, dtype=dtype)
    raise FoldError(
        f"cannot derive an example input for {type(model).__name__}: pass example_input"
    )
