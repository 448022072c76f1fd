"""Dynamic axes besides the batch axis: a sequence's length, declared, refused or proven.

An axis is declared dynamic in one place: ``DynamicAxis`` (``--dynamic-axis NAME:AXIS[:MAX]``
on the command line, ``ModelSpec.max_length`` for the default models). Axes count the batch
axis as 0, as the served shape does: ``image:1`` on ``[N, 8, 8]`` serves ``[-1, -1, 8]``.

The exporter does not say when it could not keep an axis dynamic: a Python loop over the
sequence is unrolled to the example's length and the axis silently becomes that constant. So
the written graph's inputs are checked (``check_graph_inputs``), and parity runs at lengths
other than the example's (export.parity). A model that normalizes each time step with
statistics of its own (BatchNorm per time step, as recurrent BatchNorm is done in the
literature) is refused before the export (``refuse_per_step_statistics``): its function is
specific to the lengths it has statistics for, so no one graph serves every length; it
exports with the axis fixed instead.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx
import torch
from torch import nn

from export.report import TensorInfo

# The name torch.export gives the dynamic dims (and the ONNX graph its dim_params) unless the
# axis names another: inputs whose axes share a name share one size (ids and their mask).
DEFAULT_DIM = "length"
DYNAMIC_AXIS_SYNTAX = "NAME:AXIS[:MAX]"


class DynamicAxisError(ValueError):
    """A dynamic axis cannot be exported as asked; the message says why and what to do."""


@dataclass(frozen=True)
class DynamicAxis:
    """Axis ``axis`` (>= 1; 0 is the batch axis) of input ``input`` takes any size from 1 to
    ``max_size`` (None: no cap but the server's body limits), written to config.json's
    ``max_shape``. Axes with the same ``dim`` always have the same size."""

    input: str
    axis: int
    max_size: int | None = None
    dim: str = DEFAULT_DIM


def parse_dynamic_axis(text: str) -> DynamicAxis:
    """``NAME:AXIS[:MAX]``; an ``argparse`` type."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or not parts[0]:
            raise ValueError
        axis = int(parts[1])
        cap = int(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not like {DYNAMIC_AXIS_SYNTAX}, e.g. image:1:64"
        ) from None
    if axis < 1 or (cap is not None and cap < 1):
        raise argparse.ArgumentTypeError(
            f"'{text}': AXIS must be 1 or more (0 is the batch axis, always dynamic) and MAX "
            "at least 1"
        )
    return DynamicAxis(parts[0], axis, cap)


def check_axes(
    axes: Sequence[DynamicAxis], names: Sequence[str], args: Sequence[torch.Tensor]
) -> dict[int, dict[int, DynamicAxis]]:
    """The axes by input position and axis, refused when one names no input or axis, repeats,
    or its example size cannot stand for any size (torch.export fixes sizes 0 and 1)."""
    by_input: dict[int, dict[int, DynamicAxis]] = {}
    for spec in axes:
        if spec.input not in names:
            raise DynamicAxisError(
                f"dynamic axis {spec.input}:{spec.axis}: the model has no input '{spec.input}' "
                f"(its inputs: {', '.join(names)})"
            )
        index = names.index(spec.input)
        example = args[index]
        if spec.axis >= example.dim():
            raise DynamicAxisError(
                f"dynamic axis {spec.input}:{spec.axis}: input '{spec.input}' has axes 0.."
                f"{example.dim() - 1} (0 is the batch axis)"
            )
        size = int(example.shape[spec.axis])
        if size < 2:
            raise DynamicAxisError(
                f"dynamic axis {spec.input}:{spec.axis}: the example's size there is {size}; "
                "give an example of size 2 or more (the exporter fixes sizes 0 and 1)"
            )
        if spec.max_size is not None and size > spec.max_size:
            raise DynamicAxisError(
                f"dynamic axis {spec.input}:{spec.axis}: the example's size {size} is above "
                f"its maximum {spec.max_size}"
            )
        if spec.axis in by_input.setdefault(index, {}):
            raise DynamicAxisError(f"dynamic axis {spec.input}:{spec.axis} is given twice")
        by_input[index][spec.axis] = spec
    sizes: dict[str, set[int]] = {}
    for index, specs in by_input.items():
        for axis, spec in specs.items():
            sizes.setdefault(spec.dim, set()).add(int(args[index].shape[axis]))
    for dim, seen in sizes.items():
        if len(seen) > 1:
            raise DynamicAxisError(
                f"dynamic axes named '{dim}' share one size, but the examples have "
                f"{sorted(seen)} there"
            )
    return by_input


def dynamic_shapes(
    count: int, by_input: Mapping[int, Mapping[int, DynamicAxis]]
) -> tuple[dict[int, torch.export.Dim], ...]:
    """torch.export's ``dynamic_shapes``: the batch axis of every input, and the axes given."""
    batch = torch.export.Dim("batch")
    dims: dict[str, torch.export.Dim] = {}
    shapes: list[dict[int, torch.export.Dim]] = []
    for index in range(count):
        shape = {0: batch}
        for axis, spec in by_input.get(index, {}).items():
            shape[axis] = dims.setdefault(spec.dim, torch.export.Dim(spec.dim))
        shapes.append(shape)
    return tuple(shapes)


def check_graph_inputs(
    proto: onnx.ModelProto, names: Sequence[str], by_input: Mapping[int, Mapping[int, DynamicAxis]]
) -> None:
    """Each declared axis is a symbolic dim of the written graph, not the example's size."""
    inputs = {i.name: i for i in proto.graph.input}
    for index, specs in by_input.items():
        dims = inputs[names[index]].type.tensor_type.shape.dim
        for axis, spec in specs.items():
            if dims[axis].HasField("dim_value"):
                raise DynamicAxisError(
                    f"axis {axis} of input '{spec.input}' was exported fixed at "
                    f"{dims[axis].dim_value}: the model's code specialized it (a Python loop "
                    "over the sequence is unrolled to the example's length). Loop with "
                    "models.scan.scan_steps (torch's scan) to keep it dynamic, or export "
                    "without the dynamic axis"
                )


def refuse_per_step_statistics(
    model: nn.Module,
    args: Sequence[torch.Tensor],
    by_input: Mapping[int, Mapping[int, DynamicAxis]],
) -> None:
    """Refuses a model (in eval mode) that normalizes with statistics per time step, found
    in one forward at the example's length and one at length 1: the modules holding
    running statistics (BatchNorm, or any module with a ``running_mean`` buffer) that are
    used change with the length (one BatchNorm per step), or one of them is told the step
    (an integer argument that changes from call to call, as in ``norm(x, t)``)."""
    norms = {
        m: n
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        or "running_mean" in dict(m.named_buffers(recurse=False))
    }
    if not norms:
        return
    longer = _norms_called(model, norms, args)
    shorter = _norms_called(model, norms, resized(args, by_input, 1))
    per_step = sorted(set(longer) ^ set(shorter))
    per_step += sorted(n for n, steps in longer.items() if len(steps) > 1)
    if per_step:
        shown = ", ".join(f"'{n}'" for n in per_step[:3]) + (" ..." if len(per_step) > 3 else "")
        raise DynamicAxisError(
            f"{shown} normalize each time step with statistics of its own (BatchNorm per "
            "time step): the model's function is specific to the lengths it has statistics "
            "for, so no single graph with a dynamic length computes it. Export it without "
            "the dynamic axis (for one fixed length), or normalize with LayerNorm, which "
            "needs no per-step statistics"
        )


def _norms_called(
    model: nn.Module, norms: Mapping[nn.Module, str], args: Sequence[torch.Tensor]
) -> dict[str, set[tuple[int, ...]]]:
    """Each statistics module called, with the integer arguments of its calls."""
    called: dict[str, set[tuple[int, ...]]] = {}

    def hook(module: nn.Module, given: tuple[object, ...], kwargs: dict[str, object]) -> None:
        values = [*given, *kwargs.values()]
        steps = tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool))
        called.setdefault(norms[module], set()).add(steps)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in norms]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return called


def resized(
    args: Sequence[torch.Tensor], by_input: Mapping[int, Mapping[int, DynamicAxis]], length: int
) -> list[torch.Tensor]:
    """``args`` with every dynamic axis ``length`` long (repeated, then cut)."""
    out = list(args)
    for index, specs in by_input.items():
        for axis in specs:
            t = out[index]
            reps = [1] * t.dim()
            reps[axis] = -(-length // t.shape[axis])
            out[index] = t.repeat(*reps).narrow(axis, 0, length).clone()
    return out


def infos(
    infos: Sequence[TensorInfo],
    by_input: Mapping[int, Mapping[int, DynamicAxis]],
) -> list[TensorInfo]:
    """The inputs as served: -1 at each dynamic axis, its cap in ``max_shape``."""
    out = []
    for index, info in enumerate(infos):
        specs = by_input.get(index)
        if not specs:
            out.append(info)
            continue
        shape = [-1 if a in specs else d for a, d in enumerate(info.shape)]
        caps = [_cap(specs[a]) if a in specs else d for a, d in enumerate(shape)]
        out.append(TensorInfo(info.name, info.datatype, shape, caps))
    return out


def _cap(spec: DynamicAxis) -> int:
    return -1 if spec.max_size is None else spec.max_size


def output_infos(proto: onnx.ModelProto, infos: Sequence[TensorInfo]) -> list[TensorInfo]:
    """The outputs with -1 wherever the graph's output dim is symbolic (an output that follows
    the sequence's length)."""
    graph_outputs = {o.name: o for o in proto.graph.output}
    out = []
    for info in infos:
        dims = graph_outputs[info.name].type.tensor_type.shape.dim
        shape = [
            -1 if axis == 0 or not dims[axis].HasField("dim_value") else size
            for axis, size in enumerate(info.shape)
        ]
        out.append(TensorInfo(info.name, info.datatype, shape))
    return out


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes and those of its subgraphs (a Scan's body), depth first."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                nodes.extend(all_nodes(attribute.g))
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for g in attribute.graphs:
                    nodes.extend(all_nodes(g))
    return nodes
