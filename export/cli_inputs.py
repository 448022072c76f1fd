"""The export CLI's inputs: ``--input NAME:DATATYPE:SHAPE[:LOW..HIGH]`` and example tensors.

A model with several inputs, or integer/boolean inputs (token ids, masks), is exported from
the command line by giving each input's name, V2 datatype and per-sample shape. The example
tensors only have to be valid inputs: floats are standard normal, integers lie in 0..1 (valid
as indices, masks and flags of any model) unless a range is given, booleans are random.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from export.to_onnx import TensorInfo

# V2 datatype -> torch dtype, for the datatypes an example tensor can be made of.
DATATYPES: dict[str, torch.dtype] = {
    "FP32": torch.float32, "FP16": torch.float16, "FP64": torch.float64,
    "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32, "INT64": torch.int64,
    "UINT8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
DEFAULT_INT_RANGE = (0, 1)
INPUT_SYNTAX = "NAME:DATATYPE:SHAPE[:LOW..HIGH]"
INPUT_HELP = (
    f"{INPUT_SYNTAX}, once per model input in forward()'s order, e.g. ids:INT64:16:0..999 "
    f"--input mask:BOOL:16. SHAPE has no batch axis; DATATYPE is one of "
    f"{', '.join(DATATYPES)}. Example values: floats standard normal, integers uniform in "
    f"LOW..HIGH (default {DEFAULT_INT_RANGE[0]}..{DEFAULT_INT_RANGE[1]}, valid as indices and "
    "masks), BOOL random; a range also bounds floats (uniform)"
)


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # per sample: no batch axis
    value_range: tuple[float, float] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return DATATYPES[self.datatype]

    def info(self) -> TensorInfo:
        """The repository's view of this input: axis 0 is the (variable) batch axis."""
        return TensorInfo(self.name, self.datatype, [-1, *self.shape])

    def example(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """``batch`` valid example rows (see the module docstring)."""
        size = (batch, *self.shape)
        if self.dtype == torch.bool:
            return torch.randint(0, 2, size, generator=generator).bool()
        if self.dtype.is_floating_point:
            if self.value_range is None:
                return torch.randn(size, generator=generator).to(self.dtype)
            low, high = self.value_range
            uniform = torch.rand(size, generator=generator, dtype=torch.float64)
            return (low + (high - low) * uniform).to(self.dtype)
        low, high = (int(v) for v in (self.value_range or DEFAULT_INT_RANGE))
        return torch.randint(low, high + 1, size, generator=generator).to(self.dtype)


def parse_input(text: str) -> InputSpec:
    """``NAME:DATATYPE:SHAPE[:LOW..HIGH]``; an ``argparse`` type (errors name the flag)."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or not parts[0]:
        raise argparse.ArgumentTypeError(f"'{text}' is not like {INPUT_SYNTAX}, e.g. ids:INT64:16")
    name, datatype = parts[0], parts[1].upper()
    if datatype not in DATATYPES:
        raise argparse.ArgumentTypeError(
            f"'{text}': datatype '{parts[1]}' is not one of {', '.join(DATATYPES)}"
        )
    try:
        spec = InputSpec(name, datatype, parse_shape(parts[2]))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"'{text}': {exc}") from None
    if len(parts) == 4:
        spec = InputSpec(name, datatype, spec.shape, _parse_range(parts[3], datatype, text))
    return spec


def parse_shape(text: str) -> tuple[int, ...]:
    """``3,32,32``: positive dimensions, the batch axis left out."""
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape '{text}' is not like 3,32,32") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"dimensions must be positive, got '{text}'")
    return dims


def _parse_range(text: str, datatype: str, whole: str) -> tuple[float, float]:
    low_text, sep, high_text = text.partition("..")
    number = float if DATATYPES[datatype].is_floating_point else int
    try:
        low, high = number(low_text), number(high_text)
    except ValueError:
        low, high = 1, 0  # refused below with the syntax
    if not sep or low > high or datatype == "BOOL":
        raise argparse.ArgumentTypeError(
            f"'{whole}': range '{text}' is not LOW..HIGH with LOW <= HIGH "
            f"({'integers' if number is int else 'numbers'}; BOOL takes no range)"
        )
    if number is int:
        info = torch.iinfo(DATATYPES[datatype])
        if low < info.min or high > info.max:
            raise argparse.ArgumentTypeError(
                f"'{whole}': range {low}..{high} does not fit {datatype} ({info.min}..{info.max})"
            )
    return float(low), float(high)


def examples(specs: list[InputSpec], batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One batch of example tensors, one per input, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(spec.example(batch, generator) for spec in specs)
