"""``python -m export onnx``: a user's model into the repository, refusals first.

Every mistake the user can fix is found before the export starts (an export of a large model
takes minutes): the name, the version, the labels file and an existing model's inputs before
any user code runs; then, after one forward pass on the example inputs, the label count
against the output widths and the existing model's outputs. Only then does ``export_onnx``
run. Each refusal is a ``ValueError`` subclass that ``__main__`` prints as one line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.axes import check_axes, infos
from export.checkpoint import load_into
from export.cli_imports import UserModelError, load_factory, user_code, user_folder
from export.cli_inputs import InputSpec, examples
from export.publish import check_install, check_name, entry_config, publish

# export_onnx's own output rules, so the checks before it see the names it will write.
from export.to_onnx import TensorInfo, _info, _output_names, _output_tensors, export_onnx

EXAMPLE_BATCH = 2  # torch.export specializes a batch of 1; export_onnx exports at 2
SAMPLE_BATCH = 8  # extra parity rows drawn from the declared ranges (see _samples)


class ExampleError(ValueError):
    """The model does not run on the example inputs built from the command line."""


def run_onnx(args: argparse.Namespace) -> int:
    inputs = input_specs(args)
    labels = read_labels(args.labels)
    output_names = _names(args.output_name) if args.output_name else None
    # The dynamic axes are checked against the example shapes before any user code runs.
    example_shapes = examples(inputs, EXAMPLE_BATCH)
    by_input = check_axes(args.dynamic_axis, [spec.name for spec in inputs], example_shapes)
    input_infos = infos([spec.info() for spec in inputs], by_input)
    check_name(args.name)
    check_install(
        args.repository, args.name, input_infos, replace=args.replace, version=args.version
    )
    with tempfile.TemporaryDirectory() as tmp:
        # The user's code runs inside: their factory, and their forward while it is traced.
        with user_code(user_folder(args.model)):
            model = _build(args.model)
            if args.checkpoint is not None:
                load_into(model, args.checkpoint)
            example = examples(inputs, EXAMPLE_BATCH)
            outputs = _output_infos(_forward(model, example, inputs), output_names)
            entry_config(
                args.name,
                input_infos,
                outputs,
                labels=labels,
                max_batch_size=args.max_batch_size,
            )
            check_install(args.repository, args.name, input_infos, outputs, replace=args.replace)
            report = export_onnx(
                model,
                example,
                Path(tmp) / "model.onnx",
                input_names=[spec.name for spec in inputs],
                output_names=output_names,
                opset=args.opset,
                samples=_samples(inputs),
                labels=labels,
                source=args.model,
                dynamic_axes=args.dynamic_axis,
            )
        for reason in report.kept_reasons.values():
            print(f"note: {reason}", file=sys.stderr)
        config = publish(
            args.repository,
            args.name,
            report,
            description=args.description,
            labels=labels,
            version=args.version,
            max_batch_size=args.max_batch_size,
            replace=args.replace,
        )
    print(report.summary())
    print(report.timing())
    print(f"{args.repository / args.name} version {config.latest.version}")
    return 0


def input_specs(args: argparse.Namespace) -> list[InputSpec]:
    """``--input`` as given, or the one FP32 input of ``--input-shape``/``--input-name``."""
    if args.input:
        if args.input_name is not None:
            raise ValueError("--input-name goes with --input-shape; --input NAME:... names it")
        names = [spec.name for spec in args.input]
        if len(set(names)) != len(names):
            raise ValueError(f"--input names must be unique, got {names}")
        return list(args.input)
    return [InputSpec(args.input_name or "input", "FP32", args.input_shape)]


def read_labels(text: str | None) -> list[str] | None:
    """Comma-separated labels, or ``@FILE`` with one label a line."""
    if text is None:
        return None
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ValueError(f"--labels: cannot read {path}: {reason}") from None
        return [line.strip() for line in lines if line.strip()]
    return _names(text)


def _build(target: str) -> nn.Module:
    model = load_factory(target)()
    if not isinstance(model, nn.Module):
        raise UserModelError(f"{target}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _forward(model: nn.Module, example: tuple[torch.Tensor, ...], inputs: list[InputSpec]) -> Any:
    # eval first: a training-mode BatchNorm would update its running statistics.
    model.eval()
    try:
        with torch.no_grad():
            return model(*example)
    except Exception as exc:  # anything the user's forward raises: their inputs do not fit
        given = ", ".join(f"{s.name}:{s.datatype}{[EXAMPLE_BATCH, *s.shape]}" for s in inputs)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExampleError(
            f"the model fails on example inputs {given}: {type(exc).__name__}: {first}; "
            "check --input/--input-shape (order, shape, datatype, range)"
        ) from None


def _output_infos(out: Any, names: Sequence[str] | None) -> list[TensorInfo]:
    """The outputs as export_onnx will name and record them, by its own rules (one tensor:
    'output'; a tuple: 'output_0'...; a dict or namedtuple: its keys), unless names given."""
    tensors = _output_tensors(out)
    return [_info(name, t) for name, t in zip(_output_names(out, names), tensors, strict=True)]


def _samples(inputs: list[InputSpec]) -> tuple[torch.Tensor, ...] | None:
    """Parity rows drawn like the example, where its random draws may not cover the inputs'
    values: export_onnx draws integers from 0..max(example), floats standard normal."""
    if all(s.dtype.is_floating_point and s.value_range is None for s in inputs):
        return None
    return examples(inputs, SAMPLE_BATCH, seed=1)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]
