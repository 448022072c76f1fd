"""The V1 / TensorFlow-Serving JSON form, for people with curl.

Request: ``{"instances": [sample, ...]}`` (a sample is the nested list of one input, or an
object ``{input_name: nested list}``) or the columnar ``{"inputs": batch | {name: batch}}``.
Response: ``{"predictions": [...]}``, one entry per instance; for a classifier (labels and
one ``[-1, C]`` output) each entry has the label, its probability and all probabilities.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.datatypes import DATATYPE_TO_NUMPY
from service.errors import InvalidInput
from service.protocol.request_limits import check_depth, decode_json_body
from service.repository import ModelConfig, TensorSpec


def decode_v1(payload: Any, config: ModelConfig) -> dict[str, np.ndarray]:
    """Input arrays, typed by the model's signature (JSON numbers carry no dtype)."""
    if not isinstance(payload, dict):
        raise InvalidInput('request body must be a JSON object with "instances" or "inputs"')
    if ("instances" in payload) == ("inputs" in payload):
        raise InvalidInput('request body needs exactly one of "instances" or "inputs"')
    specs = {s.name: s for s in config.inputs}
    if "instances" in payload:
        instances = payload["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidInput('"instances" must be a non-empty list')
        if all(isinstance(i, dict) for i in instances):
            columns = {name: [_field(i, name) for i in instances] for name in specs}
        elif len(specs) == 1 and not any(isinstance(i, dict) for i in instances):
            columns = {next(iter(specs)): instances}
        else:
            raise InvalidInput(
                f"each instance must be an object with the inputs {sorted(specs)}"
                if len(specs) > 1
                else "instances must be all lists or all objects"
            )
    else:
        inputs = payload["inputs"]
        if isinstance(inputs, dict):
            columns = {name: _field(inputs, name) for name in specs}
        elif len(specs) == 1:
            columns = {next(iter(specs)): inputs}
        else:
            raise InvalidInput(f'"inputs" must be an object with the inputs {sorted(specs)}')
    return {name: _array(specs[name], value) for name, value in columns.items()}


def decode_v1_body(body: bytes, max_depth: int, config: ModelConfig) -> dict[str, np.ndarray]:
    """``decode_v1`` from the raw body: JSON parse and nesting limit first."""
    payload = decode_json_body(body)
    check_depth(payload, max_depth, body)
    return decode_v1(payload, config)


def encode_v1(outputs: dict[str, np.ndarray], config: ModelConfig) -> dict[str, Any]:
    classifier = _classifier_output(config)
    if classifier is not None:
        return {"predictions": _classify(outputs[classifier.name], config.labels or [])}
    names = [s.name for s in config.outputs]
    if len(names) == 1:
        return {"predictions": outputs[names[0]].tolist()}
    rows = next(iter(outputs.values())).shape[0]
    return {"predictions": [{n: outputs[n][i].tolist() for n in names} for i in range(rows)]}


def _classifier_output(config: ModelConfig) -> TensorSpec | None:
    if config.labels is None or len(config.outputs) != 1:
        return None
    spec = config.outputs[0]
    return spec if spec.shape == [-1, len(config.labels)] else None


def _classify(logits: np.ndarray, labels: list[str]) -> list[dict[str, Any]]:
    # Softmax in float64 with the max subtracted: exact enough and never overflows.
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    best = p.argmax(axis=1)
    return [
        {
            "label": labels[int(k)],
            "probability": round(float(row[k]), 6),
            "probabilities": {
                label: round(float(v), 6) for label, v in zip(labels, row, strict=True)
            },
            "logits": [float(v) for v in raw],
        }
        for k, row, raw in zip(best, p, logits, strict=True)
    ]


def _field(obj: dict[str, Any], name: str) -> Any:
    if name not in obj:
        raise InvalidInput(f"input '{name}' is missing")
    return obj[name]


def _array(spec: TensorSpec, value: Any) -> np.ndarray:
    try:
        raw = np.asarray(value)
    except ValueError:
        raise InvalidInput(
            f"input '{spec.name}': nested lists are ragged (rows of different lengths)"
        ) from None
    kinds = "b" if spec.datatype == "BOOL" else "iuf" if spec.datatype.startswith("FP") else "iu"
    if raw.dtype.kind not in kinds or raw.dtype == object:
        raise InvalidInput(
            f"input '{spec.name}': expected {spec.datatype} numbers, got "
            f"{'ragged lists or mixed values' if raw.dtype == object else raw.dtype.kind + ' data'}"
        )
    # A number past FP32's range becomes inf, which validation then refuses with the element
    # named; numpy's overflow warning would only repeat that in the server log.
    with np.errstate(over="ignore"):
        return raw.astype(DATATYPE_TO_NUMPY[spec.datatype], copy=False)
