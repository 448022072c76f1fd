"""Model outputs → a V2 REST inference response body (JSON, or JSON header + binary)."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from service.datatypes import NUMPY_TO_DATATYPE
from service.errors import InvalidInput
from service.protocol.v2_binary import HEADER_LENGTH, encode_binary
from service.protocol.v2_json import encode_json_data
from service.protocol.v2_types import RequestedOutput


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: dict[str, np.ndarray],
    requested: list[RequestedOutput] | None,
    binary_output: bool,
) -> tuple[bytes, dict[str, str]]:
    """The response body and the headers it needs beyond the status."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array, binary in select_outputs(outputs, requested, binary_output):
        datatype = output_datatype(name, array)
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype,
            "shape": [int(dim) for dim in array.shape],
        }
        if binary:
            blob = encode_binary(name, array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = encode_json_data(name, array, datatype)
        entries.append(entry)
    document: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        document["model_version"] = model_version
    if request_id is not None:
        document["id"] = request_id
    document["outputs"] = entries
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"Content-Type": "application/json"}
    # The client splits the body by this header, then takes the blobs in the JSON's output order.
    headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
    return b"".join([header, *blobs]), headers


def select_outputs(
    outputs: dict[str, np.ndarray], requested: list[RequestedOutput] | None, binary_output: bool
) -> list[tuple[str, np.ndarray, bool]]:
    """(name, array, binary?) for each output to send, in the order they are sent."""
    if requested is None:
        return [(name, array, binary_output) for name, array in outputs.items()]
    selected = []
    for output in requested:  # checked against the model before inference (check_requested)
        binary = binary_output if output.binary is None else output.binary
        selected.append((output.name, outputs[output.name], binary))
    return selected


def check_requested(requested: list[RequestedOutput] | None, available: list[str]) -> None:
    """InvalidInput for a requested output the model does not have; called before the
    request is queued, so such a request costs no inference."""
    for output in requested or []:
        if output.name not in available:
            raise InvalidInput(
                f"requested output {output.name[:64]!r} does not exist; "
                f"the model's outputs are: {', '.join(map(repr, available))}"
            )


def output_datatype(name: str, array: np.ndarray) -> str:
    datatype = NUMPY_TO_DATATYPE.get(array.dtype.newbyteorder("="))
    if datatype is None:
        # The model produced it, not the client: a server bug, hence not InvalidInput.
        raise TypeError(f"output {name!r} has dtype {array.dtype} with no V2 datatype")
    return datatype
