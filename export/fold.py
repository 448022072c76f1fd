"""BatchNorm folding that works on real models, not only ``nn.Sequential``.

An eval-mode BatchNorm is a per-channel affine map ``y = (x - μ)·γ/√(σ²+ε) + β``; when ``x``
is the output of a convolution or linear layer and nothing else reads that output, the map
can be moved into the layer's weights (``fold_weights``). Which BatchNorm reads which
layer's output is a property of the data flow, not of the module tree, so it is observed:
the model runs once on an example input while a ``TorchFunctionMode`` counts every
operation that reads each layer's output and each layer's weight, and module hooks record
what each BatchNorm call receives. This needs no symbolic tracing (which fails on models
with data-dependent Python, such as Hugging Face's vision models) and catches what
module-pattern fusers get wrong: a layer output read twice, a layer called at two places,
one BatchNorm shared by several layers, weights used outside their module.

A BatchNorm is folded only when every one of its calls is safe; otherwise it stays, in eval
mode, and the reason is reported. The caller's model is never changed: all work happens on
a deep copy.
"""

from __future__ import annotations

import copy
import weakref
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

ExampleInput = torch.Tensor | tuple[Any, ...] | Mapping[str, Any]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FOLD_TARGETS: tuple[type[nn.Module], ...] = (*_CONV, *_CONV_T, nn.Linear)

# Calls that only read a tensor's metadata: they do not consume its values.
_METADATA_CALLS = frozenset(
    {
        "__get__", "size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous",
        "is_floating_point", "is_complex", "element_size", "storage_offset", "get_device",
        "__len__", "data_ptr", "has_names", "is_shared", "is_pinned",
    }
)  # fmt: skip


class FoldError(ValueError):
    """The model cannot be analysed for folding (for example, no input to run it on)."""


@dataclass
class FoldReport:
    """What ``fold_batchnorm`` did: BatchNorm name → the layers it went into, or why it stayed."""

    folded: dict[str, list[str]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)

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
    mean = running_mean.detach().to(torch.float64)
    scale = torch.rsqrt(running_var.detach().to(torch.float64) + eps)
    if gamma is not None:
        scale = scale * gamma.detach().to(torch.float64)
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta.detach().to(torch.float64)
    b = torch.zeros_like(mean) if bias is None else bias.detach().to(torch.float64)
    if transposed:
        in_channels, out_per_group = w.shape[:2]
        kernel = w.shape[2:]
        grouped = w.reshape(groups, in_channels // groups, out_per_group, *kernel)
        factor = scale.reshape(groups, 1, out_per_group, *([1] * len(kernel)))
        w = (grouped * factor).reshape(w.shape)
    else:
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    return w.to(dtype), (b * scale + shift).to(dtype)


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
    batchnorms = _named_batchnorms(folded)
    if not batchnorms:
        return folded, report
    if example_input is None:
        example_input = guess_example_input(folded)
    trace = _trace(folded, example_input)
    names = _module_names(folded)
    plans: list[tuple[_BatchNorm, list[nn.Module]]] = []
    for bn_name, bn in batchnorms.items():
        reason, layers = _check(bn, trace, names)
        if reason is not None:
            report.kept[bn_name] = f"BatchNorm '{bn_name}' {reason}; kept as an eval-mode BatchNorm"
            continue
        plans.append((bn, layers))
        report.folded[bn_name] = [names[id(layer)] for layer in layers]
    for bn, layers in plans:
        for layer in layers:
            _fold_into(layer, bn)
        _replace(folded, bn, FoldedBatchNorm(bn, report.folded[_name_of(batchnorms, bn)]))
    return folded, report


# ---------------------------------------------------------------------------- observation


@dataclass
class _Trace:
    layer_calls: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    # id of a layer output -> (layer, output rank); outputs are held alive in ``keep``.
    layer_outputs: dict[int, tuple[nn.Module, int]] = field(default_factory=dict)
    # Reads of each watched tensor (layer outputs, layer weights and biases).
    uses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    # Each BatchNorm call: (id of its input if a layer produced it, what produced the input).
    bn_calls: dict[int, list[tuple[int | None, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    keep: list[torch.Tensor] = field(default_factory=list)
    watched: set[int] = field(default_factory=set)
    producers: dict[int, tuple[weakref.ref[torch.Tensor], str]] = field(default_factory=dict)


class _Recorder(TorchFunctionMode):
    """Counts reads of watched tensors and remembers which call produced each tensor."""

    def __init__(self, trace: _Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", repr(func))
        produced = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not (name in _METADATA_CALLS and not produced):
            for leaf in tree_leaves((list(args), dict(kwargs))):
                if isinstance(leaf, torch.Tensor) and id(leaf) in self.trace.watched:
                    self.trace.uses[id(leaf)] += 1
        for t in produced:
            self.trace.producers[id(t)] = (weakref.ref(t), name)
        return out


def _trace(model: nn.Module, example_input: ExampleInput) -> _Trace:
    trace = _Trace()
    handles = []
    for module in model.modules():
        if isinstance(module, FOLD_TARGETS):
            for p in (module.weight, module.bias):
                if p is not None:
                    trace.watched.add(id(p))
            handles.append(module.register_forward_hook(_layer_hook(trace)))
        elif isinstance(module, _BatchNorm):
            # Its statistics and affine parameters must be read by its own calls only.
            for t in _bn_tensors(module):
                trace.watched.add(id(t))
            handles.append(module.register_forward_pre_hook(_bn_hook(trace)))
    try:
        with torch.no_grad(), _Recorder(trace):
            _call(model, example_input)
    except Exception as exc:
        raise FoldError(
            f"running {type(model).__name__} on the example input failed "
            f"({type(exc).__name__}: {exc}); pass an input the model accepts as example_input"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    return trace


def _layer_hook(trace: _Trace) -> Callable[[nn.Module, Any, Any], None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        trace.layer_calls[id(module)] += 1
        if isinstance(output, torch.Tensor):
            trace.keep.append(output)
            trace.watched.add(id(output))
            trace.layer_outputs[id(output)] = (module, output.dim())

    return hook


def _bn_hook(trace: _Trace) -> Callable[[nn.Module, Any], None]:
    def hook(module: nn.Module, args: Any) -> None:
        # Resolved now, while the input is alive: its id may be reused once it is freed.
        x = args[0] if args else None
        producer = "no tensor"
        input_id = None
        if isinstance(x, torch.Tensor):
            if id(x) in trace.layer_outputs:
                input_id = id(x)
            ref = trace.producers.get(id(x))
            producer = ref[1] if ref is not None and ref[0]() is x else "a model input"
        trace.bn_calls[id(module)].append((input_id, producer))

    return hook


def _call(model: nn.Module, example_input: ExampleInput) -> Any:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


# ---------------------------------------------------------------------------- decisions


def _check(
    bn: _BatchNorm, trace: _Trace, names: Mapping[int, str]
) -> tuple[str | None, list[nn.Module]]:
    """(None, layers to fold into) when folding ``bn`` is exact, else (why not, [])."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return (
            "tracks no running statistics (track_running_stats=False): its eval output "
            "depends on the batch, so it cannot be folded",
            [],
        )
    if type(bn).forward is not _BatchNorm.forward and not isinstance(bn, nn.SyncBatchNorm):
        return f"overrides forward() ({type(bn).__name__}), so its computation is unknown", []
    if bn._forward_hooks or bn._forward_pre_hooks:
        return "has forward hooks that could change its input or output", []
    calls = trace.bn_calls.get(id(bn), [])
    if not calls:
        return "was not called on the example input, so its input is unknown", []
    if any(trace.uses[id(t)] != len(calls) for t in _bn_tensors(bn)):
        return (
            "has statistics or parameters that the model also reads outside the BatchNorm, "
            "which folding would change",
            [],
        )
    layers: dict[int, nn.Module] = {}
    uses_per_layer: dict[int, int] = defaultdict(int)
    for input_id, producer in calls:
        found = None if input_id is None else trace.layer_outputs[input_id]
        if input_id is None or found is None:
            return (
                f"reads the output of '{producer}', not of a convolution or linear layer, "
                "so there are no weights to fold it into",
                [],
            )
        layer, rank = found
        name = names.get(id(layer), type(layer).__name__)
        reason = _layer_reason(layer, name, rank, bn, trace)
        if reason is not None:
            return reason, []
        if trace.uses[input_id] != 1:
            return (
                f"shares the output of '{name}' with {trace.uses[input_id] - 1} other "
                "operation(s), which must see the unnormalized values",
                [],
            )
        layers[id(layer)] = layer
        uses_per_layer[id(layer)] += 1
    for key, layer in layers.items():
        calls_of_layer = trace.layer_calls[key]
        if calls_of_layer != uses_per_layer[key]:
            return (
                f"follows '{names.get(key)}' at only {uses_per_layer[key]} of its "
                f"{calls_of_layer} calls; folding would change the others",
                [],
            )
        for p in (layer.weight, layer.bias):
            if p is not None and trace.uses[id(p)] != calls_of_layer:
                return (
                    f"cannot change the weights of '{names.get(key)}': they are also read "
                    "outside that layer",
                    [],
                )
    return None, list(layers.values())


def _layer_reason(
    layer: nn.Module, name: str, rank: int, bn: _BatchNorm, trace: _Trace
) -> str | None:
    """Why ``bn`` cannot be folded into ``layer``, or None."""
    if type(layer).forward is not _stock_forward(layer):
        return f"follows '{name}', whose class {type(layer).__name__} overrides forward()"
    if parametrize.is_parametrized(layer):
        return f"follows '{name}', whose weight is computed by a parametrization"
    if layer._forward_hooks or layer._forward_pre_hooks:
        return f"follows '{name}', which has forward hooks (weight_norm, pruning, ...)"
    if not layer.weight.is_floating_point():
        return f"follows '{name}', whose weight is not floating point"
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if channels != bn.num_features:
        return f"has {bn.num_features} channels but '{name}' produces {channels}"
    if isinstance(layer, nn.Linear):
        if rank != 2:
            return (
                f"normalizes axis 1 of a rank-{rank} output of Linear '{name}', whose "
                "features are on the last axis"
            )
    elif rank != _spatial_dims(layer) + 2:
        return f"reads an unbatched (rank-{rank}) output of '{name}'"
    return None


def _stock_forward(layer: nn.Module) -> Callable[..., Any]:
    """The forward() of the torch class ``layer`` is an instance of."""
    return next(cls.forward for cls in FOLD_TARGETS if isinstance(layer, cls))


def _spatial_dims(layer: nn.Module) -> int:
    for dims, kinds in ((1, (nn.Conv1d, nn.ConvTranspose1d)), (2, (nn.Conv2d, nn.ConvTranspose2d))):
        if isinstance(layer, kinds):
            return dims
    return 3


# ---------------------------------------------------------------------------- rewriting


def _fold_into(layer: nn.Module, bn: _BatchNorm) -> None:
    assert bn.running_mean is not None and bn.running_var is not None  # checked in _check
    weight, bias = fold_weights(
        layer.weight,
        layer.bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight if bn.affine else None,
        bn.bias if bn.affine else None,
        transposed=isinstance(layer, _CONV_T),
        groups=getattr(layer, "groups", 1),
    )
    layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)


def _named_batchnorms(model: nn.Module) -> dict[str, _BatchNorm]:
    found: dict[str, _BatchNorm] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and id(module) not in seen:
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


class FoldedBatchNorm(nn.Identity):
    """What stands where a folded BatchNorm stood: the identity, keeping its description.

    The configuration attributes stay (``num_features``, ``eps``...), so code that reads them
    keeps working and ``print(model)`` shows where each BatchNorm went.
    """

    def __init__(self, bn: _BatchNorm, folded_into: list[str]) -> None:
        super().__init__()
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.momentum = bn.momentum
        self.affine = bn.affine
        self.track_running_stats = bn.track_running_stats
        self.folded_into = list(folded_into)
        self.eval()

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded into {', '.join(self.folded_into)}"


def _bn_tensors(bn: _BatchNorm) -> list[torch.Tensor]:
    return [t for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias) if t is not None]


def _name_of(batchnorms: Mapping[str, _BatchNorm], bn: _BatchNorm) -> str:
    return next(name for name, module in batchnorms.items() if module is bn)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at every place ``old`` is registered (a shared module has several)."""
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)


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
        if isinstance(module, (*_CONV, *_CONV_T)):
            return torch.randn(2, module.in_channels, *[32] * _spatial_dims(module), dtype=dtype)
        if isinstance(module, nn.Linear):
            return torch.randn(2, module.in_features, dtype=dtype)
    raise FoldError(
        f"cannot derive an example input for {type(model).__name__}: pass example_input"
    )
