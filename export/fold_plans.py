"""Deciding, from a recorded trace, where each BatchNorm can go exactly, or why it must stay.

A BatchNorm folds *after* a layer (into the convolution or linear layer whose output it reads,
through row-major relabellings that keep the feature axis) or, failing that, *before* one
(into the convolution or linear layer that alone reads its output: ``W' = W·diag(s)`` over
input channels, ``b' = b + W·t``). Before a layer is exact only when nothing but that layer
sees the normalized values and the layer pads nothing with zeros: a zero pad stands for a
normalized value of 0, which the folded layer would see as a raw 0, i.e. ``t`` too small.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from export.fold_norms import (
    forward_reason,
    known_norm,
    norm_tensors,
    qualified_name,
    statistics_reason,
    tail_reason,
)
from export.fold_trace import (
    CONV,
    CONV_T,
    FOLD_TARGETS,
    MODEL_OUTPUT,
    Flow,
    NormCall,
    Trace,
    spatial_dims,
)


@dataclass(frozen=True)
class Plan:
    """Fold ``norm`` into ``layers``: the ones producing its input, or (``before``) reading
    its output."""

    norm: nn.Module
    layers: list[nn.Module]
    before: bool
    # Per layer, the BatchNorm channels it produced, when its input concatenates the layers'
    # outputs (MixNet's MixedConv2d); None: every layer gets every channel.
    channels: list[slice] | None = None


def plan(norm: nn.Module, trace: Trace, names: Mapping[int, str]) -> Plan | str:
    """Where ``norm`` folds exactly, or why it cannot (a phrase after "BatchNorm 'name'")."""
    reason = precondition_reason(norm, trace)
    if reason is not None:
        return reason
    calls = trace.norm_calls[id(norm)]
    if len(calls) == 1 and calls[0].input_id in trace.cats:
        after_cat = _after_concatenation(norm, calls[0], trace, names)
        if not isinstance(after_cat, str):
            return after_cat
        after: list[nn.Module] | str = after_cat
    else:
        after = _after_layer(norm, calls, trace, names)
    if not isinstance(after, str):
        return Plan(norm, after, before=False)
    before = _before_layer(norm, calls, trace, names)
    if not isinstance(before, str):
        return Plan(norm, before, before=True)
    return f"{after}, and {before}"


def precondition_reason(norm: nn.Module, trace: Trace) -> str | None:
    """Why ``norm`` is not a known per-channel affine map read by its own calls only, or None."""
    for check in (statistics_reason, forward_reason):
        reason = check(norm)
        if reason is not None:
            return reason
    if norm._forward_hooks or norm._forward_pre_hooks:
        return "has forward hooks that could change its input or output"
    calls = trace.norm_calls.get(id(norm), [])
    if not calls:
        return "was not called on the example input, so its input is unknown"
    if any(call.output_shape != call.input_shape for call in calls):
        return (
            "returns a tensor of another shape than its input (its parameters broadcast "
            "against it), so it is not a per-channel map of that input"
        )
    if any(trace.uses[id(t)] != len(calls) for t in norm_tensors(norm)):
        return (
            "has statistics or parameters that the model also reads outside the BatchNorm, "
            "which folding would change"
        )
    return None


def channels_of(norm: nn.Module) -> int:
    count = getattr(norm, "num_features", None)
    return int(count) if count is not None else int(norm.running_mean.numel())


# ---------------------------------------------------------------------------- after a layer


def _after_layer(
    norm: nn.Module, calls: list[NormCall], trace: Trace, names: Mapping[int, str]
) -> list[nn.Module] | str:
    """The layers ``norm`` folds into when each of its calls reads a layer's output alone."""
    uses_per_layer: dict[int, int] = defaultdict(int)
    layers: dict[int, nn.Module] = {}
    for call in calls:
        flow = trace.flows.get(call.input_id)
        if flow is None or flow.from_norm:
            return (
                f"reads the output of '{call.producer}', not of a convolution or linear layer, "
                "so there are no weights to fold it into"
            )
        layer = flow.source
        name = names.get(id(layer), type(layer).__name__)
        reason = layer_reason(layer)
        if reason is not None:
            return f"follows '{name}', {reason}"
        reason = _after_shape_reason(norm, layer, name, flow, call) or _chain_reason(
            flow, name, trace
        )
        if reason is not None:
            return reason
        layers[id(layer)] = layer
        uses_per_layer[id(layer)] += 1
    reason = _every_call_reason(layers, uses_per_layer, trace, names, "follows")
    return reason if reason is not None else list(layers.values())


def _chain_reason(flow: Flow, name: str, trace: Trace) -> str | None:
    """Why the values between layer ``name`` and the BatchNorm are not the layer's alone."""
    for depth, tensor in enumerate(flow.chain):
        if trace.changed.get(tensor):
            return (
                f"reads the output of '{name}' after {_names(trace.changed[tensor])} "
                "changed it in place"
            )
        if trace.uses[tensor] != 1:
            what = "the output" if depth == 0 else "a reshaped or averaged output"
            return (
                f"shares {what} of '{name}' with {trace.uses[tensor] - 1} other "
                f"operation(s) ({_readers(trace, tensor)}), which must see the "
                "unnormalized values"
            )
    return None


def _after_concatenation(
    norm: nn.Module, call: NormCall, trace: Trace, names: Mapping[int, str]
) -> Plan | str:
    """Fold slices of ``norm`` into the layers whose outputs its input concatenates."""
    cat = trace.cats[call.input_id]
    if trace.uses[call.input_id] != 1 or trace.changed.get(call.input_id):
        return "reads a concatenation that something else also reads or changes"
    if cat.dim != 1 or len(call.input_shape) < 2:
        return f"reads a concatenation along axis {cat.dim}, not its channel axis 1"
    layers: list[nn.Module] = []
    channels: list[slice] = []
    start = 0
    for piece, shape in zip(cat.pieces, cat.shapes, strict=True):
        flow = trace.flows.get(piece)
        if flow is None or flow.from_norm:
            return (
                "reads a concatenation of outputs that are not all a convolution's or linear "
                "layer's, so there are no weights to fold every part into"
            )
        layer = flow.source
        name = names.get(id(layer), type(layer).__name__)
        reason = layer_reason(layer)
        if reason is not None:
            return f"follows '{name}' (in a concatenation), {reason}"
        if not flow.feature_axis_is(shape, 1):
            return f"reads a concatenation whose part from '{name}' has its features elsewhere"
        busy = [t for t in flow.chain if trace.uses[t] != 1 or trace.changed.get(t)]
        if busy:
            return (
                f"reads a concatenation ('cat') whose part from '{name}' is also read or "
                f"changed elsewhere ({_readers(trace, busy[0])}), which must see the "
                "unnormalized values"
            )
        layers.append(layer)
        channels.append(slice(start, start + shape[1]))
        start += shape[1]
    if len({id(layer) for layer in layers}) != len(layers):
        return "reads a concatenation holding one layer's outputs twice"
    reason = _every_call_reason(
        {id(layer): layer for layer in layers},
        {id(layer): 1 for layer in layers},
        trace,
        names,
        "follows",
    )
    if reason is not None:
        return reason
    return Plan(norm, layers, before=False, channels=channels)


def _after_shape_reason(
    norm: nn.Module, layer: nn.Module, name: str, flow: Flow, call: NormCall
) -> str | None:
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if channels != channels_of(norm):
        return f"has {channels_of(norm)} channels but '{name}' produces {channels}"
    shape, rank = call.input_shape, len(call.input_shape)
    known = known_norm(norm)
    if known is not None and rank != known.rank:
        return f"reads a rank-{rank} tensor; {type(norm).__name__} is exact on rank {known.rank}"
    if flow.feature_axis_is(shape, 1):
        return None
    if isinstance(layer, nn.Linear):
        return (
            f"normalizes axis 1 of a rank-{rank} tensor {list(shape)} made from the output of "
            f"Linear '{name}', whose features are on the last axis"
        )
    return (
        f"normalizes axis 1 of a rank-{rank} tensor {list(shape)} made from the output of "
        f"'{name}', which is not that layer's channel axis"
    )


# ---------------------------------------------------------------------------- before a layer


def _before_layer(
    norm: nn.Module, calls: list[NormCall], trace: Trace, names: Mapping[int, str]
) -> list[nn.Module] | str:
    """The layers ``norm`` folds into when each of its calls feeds one layer and nothing else."""
    reason = tail_reason(norm)
    if reason is not None:
        return f"{reason}, so nothing can move past it into a layer after it"
    uses_per_layer: dict[int, int] = defaultdict(int)
    layers: dict[int, nn.Module] = {}
    for call in calls:
        if call.output_id is None:
            return "its output is not a tensor"
        found = _fed_layer(trace, call.output_id)
        if isinstance(found, str):
            return found
        layer, flow, shape = found
        name = names.get(id(layer), type(layer).__name__)
        reason = _before_reason(norm, layer, flow, shape) or layer_reason(layer, reads_output=False)
        if reason is not None:
            return f"its output goes into '{name}', {reason}"
        layers[id(layer)] = layer
        uses_per_layer[id(layer)] += 1
    reason = _every_call_reason(layers, uses_per_layer, trace, names, "precedes")
    return reason if reason is not None else list(layers.values())


def _fed_layer(trace: Trace, output: int) -> tuple[nn.Module, Flow, tuple[int, ...]] | str:
    """The layer that alone reads the output ``output`` (through relabellings), or why none."""
    flow_ids = trace.derived(output)
    for tensor in flow_ids:
        if trace.changed.get(tensor):
            changed = trace.changed[tensor]
            later = [r for r in trace.readers.get(tensor, []) if r not in changed]
            return (
                f"its output goes through {_names(changed)} (in place) before "
                f"{_names(later) or 'the model'} reads it, so no layer reads the normalized "
                "values directly"
            )
        if trace.uses[tensor] > 1:
            return (
                f"its output is read by {trace.uses[tensor]} operations ({_readers(trace, tensor)})"
            )
    fed = [tensor for tensor in flow_ids if tensor in trace.fed_to_layer]
    if not fed:
        readers = sorted({r for t in flow_ids for r in trace.readers.get(t, [])})
        if readers in ([], [MODEL_OUTPUT]):
            return "its output is read by no layer (it is an output of the model)"
        return (
            f"its output goes to {', '.join(repr(r) for r in readers)} before any layer, so "
            "there is no layer after it to fold it into either"
        )
    layer, shape = trace.fed_to_layer[fed[0]]
    return layer, trace.flows[fed[0]], shape


def _before_reason(
    norm: nn.Module, layer: nn.Module, flow: Flow, shape: tuple[int, ...]
) -> str | None:
    if isinstance(layer, CONV_T):
        return (
            "a transposed convolution: its border outputs sum fewer inputs, so the shift "
            "would not be one bias per channel"
        )
    channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if channels != channels_of(norm):
        return f"which takes {channels} channels, not the BatchNorm's {channels_of(norm)}"
    axis = -1 if isinstance(layer, nn.Linear) else -spatial_dims(layer) - 1
    if not flow.feature_axis_is(shape, axis):
        return (
            f"whose input {list(shape)} does not hold the normalized channels on its feature axis"
        )
    if isinstance(layer, CONV) and _zero_pads(layer):
        return (
            f"which pads with zeros (padding={layer.padding}): the pad stands for a "
            "normalized 0, which a folded layer would see as a raw 0"
        )
    return None


def _zero_pads(conv: nn.Module) -> bool:
    if conv.padding_mode != "zeros":
        return False  # reflect, replicate, circular: pads copy normalized values
    if conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any((k - 1) * d for k, d in zip(conv.kernel_size, conv.dilation, strict=True))
    return any(p != 0 for p in conv.padding)


# ---------------------------------------------------------------------------- both


# Conv2d subclasses whose forward was read (timm 1.0): they pad with zeros ("same", sized at
# run time) and then call F.conv2d with their weight and bias. A BatchNorm after them folds
# exactly; one before them would meet the zero pad.
KNOWN_PADDING_CONVS = frozenset(
    {"timm.layers.conv2d_same.Conv2dSame", "timm.layers.conv2d_same.Conv2dSameExport"}
)


def layer_reason(layer: nn.Module, *, reads_output: bool = True) -> str | None:
    """Why ``layer``'s weights cannot absorb a BatchNorm that reads its output (or, with
    ``reads_output=False``, one whose output it reads), or None."""
    known = reads_output and qualified_name(layer) in KNOWN_PADDING_CONVS
    if type(layer).forward is not _stock_forward(layer) and not known:
        return f"whose class {type(layer).__name__} overrides forward()"
    if parametrize.is_parametrized(layer):
        return "whose weight is computed by a parametrization"
    if layer._forward_hooks or layer._forward_pre_hooks:
        return "which has forward hooks (weight_norm, pruning, ...)"
    if not layer.weight.is_floating_point():
        return "whose weight is not floating point"
    return None


def _every_call_reason(
    layers: Mapping[int, nn.Module],
    uses: Mapping[int, int],
    trace: Trace,
    names: Mapping[int, str],
    relation: str,
) -> str | None:
    """Why changing ``layers`` would change calls the BatchNorm is not part of, or None."""
    for key, layer in layers.items():
        calls = trace.layer_calls[key]
        if calls != uses[key]:
            return (
                f"{relation} '{names.get(key)}' at only {uses[key]} of its {calls} calls; "
                "folding would change the others"
            )
        for p in (layer.weight, layer.bias):
            if p is not None and trace.uses[id(p)] != calls:
                return (
                    f"cannot change the weights of '{names.get(key)}': they are also read "
                    "outside that layer"
                )
    return None


def _stock_forward(layer: nn.Module) -> Callable[..., Any]:
    """The forward() of the torch class ``layer`` is an instance of."""
    return next(cls.forward for cls in FOLD_TARGETS if isinstance(layer, cls))


def _readers(trace: Trace, tensor: int) -> str:
    return ", ".join(repr(r) for r in trace.readers.get(tensor, [])) or "unknown"


def _names(ops: list[str]) -> str:
    return ", ".join(repr(op) for op in ops)
