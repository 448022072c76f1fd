"""Observing a model's data flow for BatchNorm folding: one run on an example input.

A ``TorchFunctionMode`` counts every operation that reads each watched tensor (layer outputs,
BatchNorm outputs, layer weights, BatchNorm statistics) and module hooks record what each layer
and BatchNorm call receives and returns. What is followed through the run:

- *flows*: a layer's or BatchNorm's output and the tensors made from it by row-major
  relabellings (``view``, ``reshape``, ``flatten``, ...). A relabelling keeps each element's
  feature (channel) index computable: an element at flat position ``k`` belongs to feature
  ``(k // inner) % channels``, ``inner`` being the number of elements after the feature axis.
  So an axis of a later tensor is that feature axis exactly when its size is ``channels`` and
  the sizes after it multiply to ``inner``: LeViT's ``linear(x).flatten(0, 1)`` keeps the
  linear's features on axis 1, where ``BatchNorm1d`` normalizes. Per-channel averages over
  real positions (``avg_pool2d`` counting no padding, ``adaptive_avg_pool2d``) continue a
  flow too: they commute with a per-channel affine map.
- *sums*: ``a + b`` (and ``a += b``) of watched tensors of one shape (RepVGG's branches).
- *concatenations* of layer outputs (MixNet's MixedConv2d).
- the inputs of every layer and BatchNorm call, kept alive so that ids stay unique, and what
  changed a watched tensor in place.

Nothing is traced symbolically, so models with data-dependent Python work as they run.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from export.fold_norms import is_norm, norm_tensors

ExampleInput = torch.Tensor | tuple[Any, ...] | Mapping[str, Any]

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FOLD_TARGETS: tuple[type[nn.Module], ...] = (*CONV, *CONV_T, nn.Linear)

# Calls that only read a tensor's metadata: they do not consume its values.
_METADATA_CALLS = frozenset(
    {
        "__get__", "size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous",
        "is_floating_point", "is_complex", "element_size", "storage_offset", "get_device",
        "__len__", "data_ptr", "has_names", "is_shared", "is_pinned",
    }
)  # fmt: skip
# Calls whose arguments after the first are read for their shape or dtype only.
_SHAPE_OF_OTHERS = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})
# Row-major relabellings: the output holds the input's elements in the same flat order.
_RELABELS = frozenset(
    {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze",
     "contiguous", "clone"}
)  # fmt: skip
# Identity in eval mode; recognised only when the call really returned its input unchanged.
_DROPOUTS = frozenset(
    {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}
)


MODEL_OUTPUT = "the model's output"


class FoldError(ValueError):
    """The model cannot be analysed for folding (for example, no input to run it on)."""


@dataclass(frozen=True)
class Flow:
    """A tensor whose elements are a layer's or BatchNorm's output, relabelled row-major."""

    source: nn.Module
    from_norm: bool
    channels: int
    inner: int
    chain: tuple[int, ...]  # ids from the source's output to this tensor

    def feature_axis_is(self, shape: Sequence[int], axis: int) -> bool:
        """Whether ``axis`` of a tensor of ``shape`` in this flow is the feature axis."""
        axis = axis % len(shape) if shape else 0
        return (
            len(shape) > axis
            and shape[axis] == self.channels
            and math.prod(shape[axis + 1 :]) == self.inner
        )


@dataclass(frozen=True)
class Concatenation:
    dim: int
    pieces: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]


@dataclass
class NormCall:
    input_id: int
    input_shape: tuple[int, ...]
    producer: str
    output_id: int | None = None
    output_shape: tuple[int, ...] | None = None


@dataclass
class Trace:
    layer_calls: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    # id(layer) -> id of its first positional input, per call.
    layer_inputs: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    # id of a tensor fed to a layer -> that layer, and the input's shape.
    fed_to_layer: dict[int, tuple[nn.Module, tuple[int, ...]]] = field(default_factory=dict)
    flows: dict[int, Flow] = field(default_factory=dict)
    # Reads of each watched tensor, and the names of the operations that read it.
    uses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    readers: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    # Watched tensor -> the operations that changed it in place (F.relu(inplace=True), +=).
    changed: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    norm_calls: dict[int, list[NormCall]] = field(default_factory=lambda: defaultdict(list))
    # id of ``a + b`` -> (id a, id b), for watched a and b of the sum's shape.
    sums: dict[int, tuple[int, int]] = field(default_factory=dict)
    # Key of the value a tensor had before ``+=`` changed it -> that tensor's id.
    aliases: dict[int, int] = field(default_factory=dict)
    # ``torch.cat`` of layer outputs (watched) -> what it concatenated.
    cats: dict[int, Concatenation] = field(default_factory=dict)
    # ``t + 0`` (MobileOne starts its sums from 0) -> id of t.
    zero_adds: dict[int, int] = field(default_factory=dict)
    keep: list[torch.Tensor] = field(default_factory=list)
    watched: set[int] = field(default_factory=set)
    producers: dict[int, tuple[weakref.ref[torch.Tensor], str]] = field(default_factory=dict)
    output: Any = None

    def watch(self, tensor: torch.Tensor) -> None:
        self.keep.append(tensor)
        self.watched.add(id(tensor))

    def derived(self, root: int) -> list[int]:
        """Ids of the tensors in the flow that starts at tensor ``root`` (root included)."""
        return [key for key, flow in self.flows.items() if flow.chain[0] == root]


class _Recorder(TorchFunctionMode):
    """Counts reads of watched tensors and follows flows and sums through each call."""

    def __init__(self, trace: Trace) -> None:
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
        first = args[0] if args else None
        if _passes_through(name, first, args, kwargs, out):
            return out
        if not (name in _METADATA_CALLS and not produced):
            read = args[:1] if name in _SHAPE_OF_OTHERS else (list(args), dict(kwargs))
            for leaf in tree_leaves(read):
                if isinstance(leaf, torch.Tensor) and id(leaf) in self.trace.watched:
                    self.trace.uses[id(leaf)] += 1
                    self.trace.readers[id(leaf)].append(name)
        if name in ("cat", "concat", "concatenate") and isinstance(out, torch.Tensor):
            self._concatenation(first, args, kwargs, out)
        if isinstance(out, torch.Tensor) and isinstance(first, torch.Tensor):
            if out is first and id(first) in self.trace.watched:
                self.trace.changed[id(first)].append(name)
            self._follow(name, first, args, kwargs, out)
        for t in produced:
            self.trace.producers[id(t)] = (weakref.ref(t), name)
        return out

    def _concatenation(
        self, pieces: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: torch.Tensor
    ) -> None:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if not isinstance(pieces, list | tuple) or not isinstance(dim, int) or out.dim() == 0:
            return
        if not all(isinstance(p, torch.Tensor) and id(p) in self.trace.flows for p in pieces):
            return
        self.trace.cats[id(out)] = Concatenation(
            dim % out.dim(), tuple(id(p) for p in pieces), tuple(tuple(p.shape) for p in pieces)
        )
        self.trace.watch(out)

    def _follow(
        self,
        name: str,
        first: torch.Tensor,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        out: torch.Tensor,
    ) -> None:
        flow = self.trace.flows.get(id(first))
        if (
            name in _RELABELS
            and flow is not None
            and out.dtype == first.dtype
            and out.numel() == first.numel()
        ):
            self.trace.flows[id(out)] = Flow(
                flow.source, flow.from_norm, flow.channels, flow.inner, (*flow.chain, id(out))
            )
            self.trace.watch(out)
        elif (
            flow is not None
            and _averages_channels(name, args, kwargs)
            and first.dim() >= 3
            and flow.feature_axis_is(first.shape, 1)
        ):
            # A per-channel average of real inputs commutes with a per-channel affine map.
            inner = math.prod(out.shape[2:])
            self.trace.flows[id(out)] = Flow(
                flow.source, flow.from_norm, flow.channels, inner, (*flow.chain, id(out))
            )
            self.trace.watch(out)
        elif name == "add" and len(args) == 2 and not kwargs and _is_zero(args[1]):
            if id(first) in self.trace.watched:
                self.trace.zero_adds[id(out)] = id(first)
                self.trace.watch(out)
        elif name in ("add", "add_", "__iadd__") and len(args) == 2 and not kwargs:
            other = args[1]
            if not (
                isinstance(other, torch.Tensor)
                and id(first) in self.trace.watched
                and id(other) in self.trace.watched
                and first.shape == other.shape == out.shape
            ):
                return
            if out is not first:
                self.trace.sums[id(out)] = (id(first), id(other))
                self.trace.watch(out)
            else:
                # ``a += b``: the old value of a gets a key of its own (negative, so no tensor
                # id collides) with the reads it had (this one included); the new value is a
                # sum that starts unread. ``changed`` keeps a from folding as if unchanged.
                old = -len(self.trace.sums) - 1
                if id(first) in self.trace.sums:
                    self.trace.sums[old] = self.trace.sums[id(first)]
                else:
                    self.trace.aliases[old] = id(first)
                self.trace.uses[old] = self.trace.uses.pop(id(first), 0)
                self.trace.sums[id(first)] = (old, id(other))


_AVG_POOL_PARAMETERS = (
    "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override",
)  # fmt: skip


def _averages_channels(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """Whether the call averages each channel over real input positions only (no zero pad
    counted, no divisor override), so that avg(x·s + t) = avg(x)·s + t exactly."""
    if name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"):
        return True
    if name not in ("avg_pool1d", "avg_pool2d", "avg_pool3d"):
        return False
    given = {**dict(zip(_AVG_POOL_PARAMETERS, args[1:], strict=False)), **kwargs}
    padding = given.get("padding", 0)
    padded = any(p != 0 for p in padding) if isinstance(padding, list | tuple) else padding != 0
    return given.get("divisor_override") is None and (
        not padded or given.get("count_include_pad", True) is False
    )


def _is_zero(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def _passes_through(
    name: str, first: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: Any
) -> bool:
    """A call that handed back its own, unchanged input: it reads nothing."""
    if out is not first or not isinstance(first, torch.Tensor):
        return False
    if name in _RELABELS:
        return True
    training = args[2] if len(args) > 2 else kwargs.get("training")
    return name in _DROPOUTS and training is False


def trace_model(model: nn.Module, example_input: ExampleInput) -> Trace:
    """Run ``model`` once on ``example_input``, recording its data flow (see module docstring)."""
    trace = Trace()
    handles = []
    for module in model.modules():
        if isinstance(module, FOLD_TARGETS):
            for p in (module.weight, module.bias):
                if p is not None:
                    trace.watched.add(id(p))
            handles.append(module.register_forward_pre_hook(_layer_pre_hook(trace)))
            handles.append(module.register_forward_hook(_layer_hook(trace)))
        elif is_norm(module):
            # Its statistics and affine parameters must be read by its own calls only.
            for t in norm_tensors(module):
                trace.watched.add(id(t))
            handles.append(module.register_forward_pre_hook(_norm_pre_hook(trace)))
            handles.append(module.register_forward_hook(_norm_hook(trace)))
    try:
        with torch.no_grad(), _Recorder(trace):
            trace.output = call_model(model, example_input)
        # What the model returns is read too, though by no operation inside it.
        for leaf in tree_leaves(trace.output):
            if isinstance(leaf, torch.Tensor) and id(leaf) in trace.watched:
                trace.uses[id(leaf)] += 1
                trace.readers[id(leaf)].append(MODEL_OUTPUT)
    except Exception as exc:
        raise FoldError(
            f"running {type(model).__name__} on the example input failed "
            f"({type(exc).__name__}: {exc}); pass an input the model accepts as example_input"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    return trace


def call_model(model: nn.Module, example_input: ExampleInput) -> Any:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def _layer_pre_hook(trace: Trace) -> Callable[[nn.Module, Any], None]:
    def hook(module: nn.Module, args: Any) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor):
            trace.keep.append(x)  # alive, so that its id names it alone
            trace.layer_inputs[id(module)].append(id(x))
            trace.fed_to_layer[id(x)] = (module, tuple(x.shape))
        else:
            trace.layer_inputs[id(module)].append(-1)

    return hook


def _layer_hook(trace: Trace) -> Callable[[nn.Module, Any, Any], None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        trace.layer_calls[id(module)] += 1
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(module, nn.Linear):
            channels, inner = output.shape[-1] if output.dim() else 0, 1
        else:
            spatial = spatial_dims(module)
            if output.dim() <= spatial:
                return
            channels = output.shape[-spatial - 1]
            inner = math.prod(output.shape[-spatial:])
        trace.watch(output)
        trace.flows[id(output)] = Flow(module, False, channels, inner, (id(output),))

    return hook


def _norm_pre_hook(trace: Trace) -> Callable[[nn.Module, Any], None]:
    def hook(module: nn.Module, args: Any) -> None:
        # Resolved now, while the input is alive: its id may be reused once it is freed.
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            trace.norm_calls[id(module)].append(NormCall(-1, (), "no tensor"))
            return
        trace.keep.append(x)
        ref = trace.producers.get(id(x))
        producer = ref[1] if ref is not None and ref[0]() is x else "a model input"
        trace.norm_calls[id(module)].append(NormCall(id(x), tuple(x.shape), producer))

    return hook


def _norm_hook(trace: Trace) -> Callable[[nn.Module, Any, Any], None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        calls = trace.norm_calls[id(module)]
        if not calls or not isinstance(output, torch.Tensor):
            return
        calls[-1].output_shape = tuple(output.shape)
        if output.dim() < 2:
            return
        calls[-1].output_id = id(output)
        trace.watch(output)
        inner = math.prod(output.shape[2:])
        trace.flows[id(output)] = Flow(module, True, output.shape[1], inner, (id(output),))

    return hook


def spatial_dims(layer: nn.Module) -> int:
    for dims, kinds in ((1, (nn.Conv1d, nn.ConvTranspose1d)), (2, (nn.Conv2d, nn.ConvTranspose2d))):
        if isinstance(layer, kinds):
            return dims
    return 3
