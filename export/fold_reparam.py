"""Structural re-parameterization: parallel branches summed into one output become one conv.

RepVGG computes ``bn1(conv3x3(x)) + bn2(conv1x1(x)) + bn3(x)``. Once bn1 and bn2 are folded,
each term is a linear map of the same ``x``, and so is their sum: one convolution whose kernel
is the 3x3 kernel plus the 1x1 kernel placed at the tap that reads the same input position
(the centre when the 1x1 pads 0 and the 3x3 pads 1), plus ``diag(s)`` there for ``bn3``
(``s = γ/√(σ²+ε)``), with the biases and ``bn3``'s shift summed. This is exact when every
term reads the same tensor, strides and groups agree, each branch tap lands on a tap of the
main kernel, and nothing but the sum reads a branch. The other branches then return a zero
scalar (``MergedBranch``), so the sum still runs but adds exact zeros.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from export.fold_norms import affine_of, tail_reason
from export.fold_plans import Plan, layer_reason, precondition_reason
from export.fold_trace import CONV, Trace


@dataclass
class Merge:
    """``main`` absorbs the convolutions ``convs`` and the BatchNorms ``norms`` beside it."""

    main: nn.Module
    convs: list[nn.Module] = field(default_factory=list)
    norms: list[nn.Module] = field(default_factory=list)
    # Per absorbed conv: for each spatial axis, the main tap of each of its taps.
    taps: list[list[list[int]]] = field(default_factory=list)
    centre: list[int] = field(default_factory=list)
    # The branch (a conv or an identity BatchNorm) whose output a ``+=`` changes in place:
    # the merged conv must run there, since a zero scalar cannot take ``+=`` of a full tensor.
    # None: the merged conv runs where ``main`` is.
    host: nn.Module | None = None


def find_merges(
    trace: Trace, plans: Mapping[int, Plan], norms: Mapping[int, nn.Module]
) -> tuple[list[Merge], dict[int, str]]:
    """The exact merges in ``trace``'s sums, and for each BatchNorm that is a term of a sum
    that cannot merge, why not."""
    outputs = _norm_outputs(trace, norms)
    operands = {t for pair in trace.sums.values() for t in pair}
    merges: list[Merge] = []
    reasons: dict[int, str] = {}
    for root in trace.sums:
        if root in operands and trace.uses[root] == 1:
            continue  # part of a larger sum
        leaves = _leaves(trace, root)
        terms = [_term(trace, leaf, outputs, plans) for leaf in leaves]
        identity = [t for t in terms if isinstance(t, nn.Module)]
        if not identity and not all(isinstance(t, tuple) for t in terms):
            continue
        targets = _in_place_leaves(trace, root)
        hosts = (
            None
            if targets is None
            else [t for leaf, t in zip(leaves, terms, strict=True) if leaf in targets]
        )
        found = _merge(trace, terms, hosts)
        if isinstance(found, Merge):
            merges.append(found)
        else:
            for norm in identity:
                reasons[id(norm)] = found
    return merges, reasons


def _norm_outputs(trace: Trace, norms: Mapping[int, nn.Module]) -> dict[int, nn.Module]:
    found = {}
    for key, norm in norms.items():
        calls = trace.norm_calls.get(key, [])
        if len(calls) == 1 and calls[0].output_id is not None:
            found[calls[0].output_id] = norm
    return found


def _leaves(trace: Trace, root: int) -> list[int]:
    stack, leaves = [root], []
    while stack:
        tensor = stack.pop()
        if tensor in trace.sums and (tensor == root or trace.uses[tensor] == 1):
            stack.extend(trace.sums[tensor])
        else:
            leaves.append(tensor)
    return leaves


def _in_place_leaves(trace: Trace, root: int) -> set[int] | None:
    """The leaves one of which must stay a full tensor: those of the value that ``+=`` changed
    in place (its first ``+=``), or None when the sum was never changed in place."""
    node = root
    while node in trace.sums and trace.sums[node][0] < 0:
        node = trace.sums[node][0]
    if node == root:
        return None
    return set(_leaves(trace, node)) if node in trace.sums else {node}


Term = tuple[nn.Module, int] | nn.Module | str  # (conv, its input) | identity BatchNorm | why not


def _term(
    trace: Trace, leaf: int, outputs: Mapping[int, nn.Module], plans: Mapping[int, Plan]
) -> Term:
    if trace.uses[leaf] != 1:
        return f"a term of the sum is also read by {trace.uses[leaf] - 1} other operation(s)"
    leaf = trace.aliases.get(leaf, leaf)  # the value before ``+=``: what its id named then
    if leaf in trace.zero_adds:  # ``t + 0``: the term is t, which only the ``+ 0`` may read
        leaf = trace.zero_adds[leaf]
        if trace.uses[leaf] != 1:
            return f"a term of the sum is also read by {trace.uses[leaf] - 1} other operation(s)"
    norm = outputs.get(leaf)
    if norm is not None:
        if tail_reason(norm) is not None:
            return f"a term of the sum is a BatchNorm that {tail_reason(norm)}"
        folded = plans.get(id(norm))
        if folded is None:
            if precondition_reason(norm, trace) is not None:
                return "a term of the sum is a BatchNorm that cannot be folded at all"
            return norm
        call = trace.norm_calls[id(norm)][0]
        flow = trace.flows.get(call.input_id)
        if folded.before or flow is None or len(flow.chain) != 1:
            return "a term of the sum is a BatchNorm folded elsewhere"
        leaf = call.input_id
    flow = trace.flows.get(leaf)
    if flow is None or flow.from_norm or len(flow.chain) != 1 or not isinstance(flow.source, CONV):
        return "a term of the sum is not a convolution or a BatchNorm of the shared input"
    conv = flow.source
    inputs = trace.layer_inputs[id(conv)]
    if (
        len(inputs) != 1
        or layer_reason(conv, reads_output=False) is not None
        or conv.padding_mode != "zeros"
    ):
        return "a convolution in the sum is called more than once or is not a plain Conv"
    if any(p is not None and trace.uses[id(p)] != 1 for p in (conv.weight, conv.bias)):
        return "a convolution in the sum has weights read elsewhere"
    return conv, inputs[0]


def _merge(trace: Trace, terms: list[Term], hosts: list[Term] | None) -> Merge | str:
    """One convolution computing the sum of ``terms`` (run at one of ``hosts`` when given),
    or why the sum is not one."""
    prefix = "the sum it feeds cannot become one convolution: "
    for term in terms:
        if isinstance(term, str):
            return prefix + term
    convs = [t for t in terms if isinstance(t, tuple)]
    norms = [t for t in terms if isinstance(t, nn.Module)]
    if not convs:
        return prefix + "no convolution computes any of its terms"
    shared = {x for _, x in convs} | {trace.norm_calls[id(n)][0].input_id for n in norms}
    if len(shared) != 1:
        return prefix + "its terms read different tensors"
    main = max((c for c, _ in convs), key=lambda c: c.weight[0, 0].numel())
    merge = Merge(main)
    for conv, _ in convs:
        if conv is main:
            continue
        same = ("in_channels", "out_channels", "groups", "stride")
        if type(conv) is not type(main) or any(getattr(conv, a) != getattr(main, a) for a in same):
            return prefix + "its convolutions differ in type, channels, groups or stride"
        taps = _taps(conv, main)
        if taps is None:
            return prefix + "a branch's taps do not land on the main kernel's taps"
        merge.convs.append(conv)
        merge.taps.append(taps)
    if norms:
        centre = _centre(main)
        if centre is None or main.in_channels != main.out_channels:
            return prefix + "an identity branch needs stride 1, equal channels and a centred tap"
        merge.centre = centre
        merge.norms = norms
    if hosts is not None and not any(isinstance(h, tuple) and h[0] is main for h in hosts):
        host = hosts[0] if hosts else None
        if host is None or isinstance(host, str):
            return prefix + "a branch is changed in place"
        merge.host = host[0] if isinstance(host, tuple) else host
    return merge


def _padding(conv: nn.Module) -> list[int] | None:
    if conv.padding == "valid":
        return [0] * len(conv.kernel_size)
    if conv.padding == "same":
        total = [(k - 1) * d for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
        return None if any(t % 2 for t in total) else [t // 2 for t in total]
    return list(conv.padding)


def _taps(branch: nn.Module, main: nn.Module) -> list[list[int]] | None:
    """Per axis, the main kernel tap reading the input position each branch tap reads."""
    pad_b, pad_m = _padding(branch), _padding(main)
    if pad_b is None or pad_m is None:
        return None
    taps = []
    for axis, size in enumerate(branch.kernel_size):
        positions = []
        for j in range(size):
            offset = pad_m[axis] - pad_b[axis] + branch.dilation[axis] * j
            tap, rest = divmod(offset, main.dilation[axis])
            if rest or not 0 <= tap < main.kernel_size[axis]:
                return None
            positions.append(tap)
        taps.append(positions)
    return taps


def _centre(main: nn.Module) -> list[int] | None:
    """The tap reading output position's own input position, when the stride is 1."""
    pad = _padding(main)
    if pad is None or any(s != 1 for s in main.stride):
        return None
    centre = []
    for axis, p in enumerate(pad):
        tap, rest = divmod(p, main.dilation[axis])
        if rest or not 0 <= tap < main.kernel_size[axis]:
            return None
        centre.append(tap)
    return centre


def merged_weights(merge: Merge) -> tuple[torch.Tensor, torch.Tensor]:
    """The main convolution's weight and bias with every branch added, computed in float64."""
    main = merge.main
    weight = main.weight.detach().to(torch.float64).clone()
    bias = torch.zeros(main.out_channels, dtype=torch.float64, device=weight.device)
    for conv in (main, *merge.convs):
        if conv.bias is not None:
            bias += conv.bias.detach().to(torch.float64)
    for conv, taps in zip(merge.convs, merge.taps, strict=True):
        branch = conv.weight.detach().to(torch.float64)
        for position in itertools.product(*(range(len(t)) for t in taps)):
            target = tuple(taps[axis][j] for axis, j in enumerate(position))
            weight[(slice(None), slice(None), *target)] += branch[
                (slice(None), slice(None), *position)
            ]
    channels = torch.arange(main.out_channels, device=weight.device)
    per_group = main.in_channels // main.groups
    for norm in merge.norms:
        affine = affine_of(norm)
        weight[(channels, channels % per_group, *merge.centre)] += affine.scale
        bias += affine.shift
    return weight.to(main.weight.dtype), bias.to(main.weight.dtype)
