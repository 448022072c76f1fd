"""What a model accepts, and the checks of a request's tensors against it.

Kept apart from the runtime (no onnxruntime import) and picklable: the HTTP front sends it
with a large body to the process that decodes that body, so a request that cannot fit the
model is refused there before its data is converted.

Every refusal is ``InvalidInput`` naming the input, what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.datatypes import datatype_of
from service.errors import InvalidInput
from service.repository import TensorSpec


@dataclass(frozen=True)
class Signature:
    model: str
    inputs: Sequence[TensorSpec]
    max_batch_size: int
    _by_name: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {spec.name: spec for spec in self.inputs})

    def check_declared(self, name: str, datatype: str, shape: tuple[int, ...]) -> None:
        """What ``validate`` checks of one input that its declaration alone decides (name,
        datatype, rank, dims, batch): for codecs to refuse a request before converting data."""
        spec = self._by_name.get(name)
        if spec is None:
            raise InvalidInput(
                f"model '{self.model}' has no input(s) [{name[:64]!r}]; its inputs are "
                f"{sorted(self._by_name)}"
            )
        _check_declared(spec, datatype, shape, self.max_batch_size)

    def validate(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The inputs in signature order, checked: names, datatype, rank, dims, batch, finite."""
        unexpected = sorted(set(tensors) - set(self._by_name))
        if unexpected:
            raise InvalidInput(
                f"model '{self.model}' has no input(s) {unexpected}; its inputs are "
                f"{sorted(self._by_name)}"
            )
        checked: dict[str, np.ndarray] = {}
        batch: int | None = None
        for spec in self.inputs:
            if spec.name not in tensors:
                raise InvalidInput(f"input '{spec.name}' is missing")
            array = tensors[spec.name]
            _check_declared(spec, datatype_of(array), array.shape, self.max_batch_size)
            if batch is not None and array.shape[0] != batch:
                raise InvalidInput(
                    f"input '{spec.name}' has batch size {array.shape[0]}, but another input "
                    f"has {batch}: all inputs must have the same batch size"
                )
            batch = array.shape[0]
            checked[spec.name] = _check_values(spec, array)
        return checked


def _check_declared(
    spec: TensorSpec, datatype: str, shape: tuple[int, ...] | list[int], max_batch: int
) -> None:
    if datatype != spec.datatype:
        raise InvalidInput(
            f"input '{spec.name}': expected datatype {spec.datatype}, got {datatype}"
        )
    shape = list(shape)
    if len(shape) != len(spec.shape):
        raise InvalidInput(
            f"input '{spec.name}': expected shape {spec.shape} (rank {len(spec.shape)}), got "
            f"{_shown(shape)} (rank {len(shape)})" + _unbatched_hint(spec, shape)
        )
    for axis, (want_dim, got_dim) in enumerate(zip(spec.shape, shape, strict=True)):
        if want_dim != -1 and want_dim != got_dim:
            raise InvalidInput(
                f"input '{spec.name}': expected shape {spec.shape}, got {shape} "
                f"(axis {axis} must be {want_dim})"
            )
    if shape[0] < 1:
        raise InvalidInput(f"input '{spec.name}': the batch is empty (shape {shape})")
    for axis in spec.variable_axes():
        _check_length(spec, shape, axis)
    if shape[0] > max_batch:
        raise InvalidInput(
            f"input '{spec.name}': batch size {shape[0]} exceeds the model's maximum "
            f"{max_batch} (axis 0 is the batch axis); split the request"
        )


def _check_length(spec: TensorSpec, shape: list[int], axis: int) -> None:
    """A variable axis (a sequence's length) holds at least 1 and at most its cap: an
    empty sequence has no last step to answer from, and the cap bounds one request's work."""
    if shape[axis] < 1:
        raise InvalidInput(
            f"input '{spec.name}': axis {axis} is empty (shape {shape}); the model's variable "
            f"axis {axis} takes a size of at least 1"
        )
    cap = -1 if spec.max_shape is None else spec.max_shape[axis]
    if cap != -1 and shape[axis] > cap:
        raise InvalidInput(
            f"input '{spec.name}': axis {axis} has size {shape[axis]}, above the model's "
            f"maximum {cap} (max_shape {spec.max_shape}); shorten the sequence or split it"
        )


def _shown(shape: list[int]) -> str:
    # A shape can have up to 64 dimensions of any size: keep messages short.
    text = str(shape)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_values(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    if spec.datatype == "BYTES":
        return _as_text(spec, array)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array.reshape(-1)))[0])
        raise InvalidInput(
            f"input '{spec.name}': values must be finite; element {bad} (row-major) is "
            f"{array.reshape(-1)[bad]}"
        )
    return np.ascontiguousarray(array)


def _as_text(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """A BYTES input as onnxruntime takes a string tensor: str elements. Its Python binding
    reads any other object through str() (b'7' would become the text "b'7'"), and it holds
    no bytes that are not text, so those are refused here. One C-level pass per element
    (str.decode in a comprehension); the slow search for the culprit runs only on failure."""
    flat = array.reshape(-1).tolist()
    try:
        texts = [v if isinstance(v, str) else v.decode("utf-8") for v in flat]
    except (UnicodeDecodeError, AttributeError):
        index = next(i for i, v in enumerate(flat) if not _is_text(v))
        raise InvalidInput(
            f"input '{spec.name}': BYTES element {index} (row-major) is not UTF-8 text; "
            "the model's string tensors hold text only"
        ) from None
    text = np.empty(len(texts), dtype=np.object_)
    text[:] = texts
    return text.reshape(array.shape)


def _is_text(value: object) -> bool:
    if isinstance(value, str):
        return True
    try:
        bytes(value).decode("utf-8")  # type: ignore[call-overload]
    except (UnicodeDecodeError, TypeError):
        return False
    return True


def _unbatched_hint(spec: TensorSpec, shape: list[int]) -> str:
    if len(shape) == len(spec.shape) - 1 and all(
        w in (-1, g) for w, g in zip(spec.shape[1:], shape, strict=True)
    ):
        return f"; the batch dimension is missing: send shape [1, {', '.join(map(str, shape))}]"
    return ""
