"""gRPC's ModelInferRequest -> ``InferRequest``, and model outputs -> ModelInferResponse.

Only what is gRPC's own lives here: which ``InferTensorContents`` field carries which
datatype, the ``raw_input_contents`` / ``raw_output_contents`` lists and the
``InferParameter`` oneof. The checks are the REST codec's, in the same cheap-first order:
tensor count and element limits (service.protocol.request_limits), datatype and shape
(``check_shape``, the model's ``Signature`` via ``check``), then the data, converted by the
same functions (``decode_binary`` for raw bytes, ``convert_flat`` for typed values).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.datatypes import DATATYPE_TO_NUMPY
from service.errors import InvalidInput
from service.grpc.generated import grpc_service_pb2 as pb
from service.protocol.request_limits import (
    Limits,
    check_elements,
    check_shape,
    check_tensor_count,
)
from service.protocol.v2_binary import decode_binary, encode_binary, object_array
from service.protocol.v2_json import convert_flat
from service.protocol.v2_request import UNSUPPORTED_TENSOR_PARAMETERS, once_each, timeout_ms
from service.protocol.v2_response import output_datatype, select_outputs
from service.protocol.v2_types import DeclaredCheck, InferRequest, InputSpec, RequestedOutput

# The typed field of InferTensorContents for each datatype (Triton's table). FP16 has none:
# it travels only as raw bytes.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(parameter: Any) -> Any:
    """An InferParameter's value (None when none of its oneof is set)."""
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def parameters_of(parameters: Any) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in parameters.items()}


def decode_request(
    request: Any, limits: Limits, check: DeclaredCheck | None = None
) -> InferRequest:
    """A ModelInferRequest as the protocol's InferRequest; InvalidInput naming the problem."""
    check_tensor_count(len(request.inputs) + len(request.outputs), limits)
    if not request.inputs:
        raise InvalidInput("'inputs' is empty: the request needs at least one input")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, in the order of 'inputs', or none and typed contents"
        )
    specs = [_input_spec(tensor, limits) for tensor in request.inputs]
    once_each([spec.name for spec in specs], "input {!r} appears more than once in 'inputs'")
    if check is not None:
        for spec in specs:
            check(spec.name, spec.datatype, spec.shape)
    if raw:
        inputs = {
            spec.name: _decode_raw(spec, t, r)
            for spec, t, r in zip(specs, request.inputs, raw, strict=True)
        }
    else:
        inputs = {
            spec.name: _decode_typed(spec, t) for spec, t in zip(specs, request.inputs, strict=True)
        }
    parameters = parameters_of(request.parameters)
    binary_output = parameters.get("binary_data_output", True)
    if not isinstance(binary_output, bool):
        raise InvalidInput("request parameter 'binary_data_output' must be a bool_param")
    return InferRequest(
        id=request.id or None,
        inputs=inputs,
        outputs=_requested(request.outputs),
        binary_output=binary_output,
        timeout_ms=timeout_ms(parameters.get("timeout")),
        parameters=parameters,
    )


def _input_spec(tensor: Any, limits: Limits) -> InputSpec:
    name = tensor.name
    if not name:
        raise InvalidInput("an input has no 'name'")
    if tensor.datatype not in DATATYPE_TO_NUMPY:
        supported = ", ".join(DATATYPE_TO_NUMPY)
        raise InvalidInput(
            f"input {name!r}: unsupported datatype {tensor.datatype[:32]!r}; supported: {supported}"
        )
    shape = check_shape(name, list(tensor.shape))
    check_elements(name, shape, limits)
    for key in UNSUPPORTED_TENSOR_PARAMETERS:
        if key in tensor.parameters:
            raise InvalidInput(f"input {name!r}: parameter {key!r} is not supported")
    return InputSpec(name, tensor.datatype, shape, None, None)


def _decode_raw(spec: InputSpec, tensor: Any, raw: bytes) -> np.ndarray:
    if tensor.HasField("contents"):
        raise spec.fail("has both typed 'contents' and raw_input_contents; send one of them")
    return decode_binary(spec, raw)


def _decode_typed(spec: InputSpec, tensor: Any) -> np.ndarray:
    field = CONTENTS_FIELD.get(spec.datatype)
    if field is None:
        raise spec.fail(f"{spec.datatype} has no typed contents field: send raw_input_contents")
    contents = tensor.contents
    others = [f.name for f, _ in contents.ListFields() if f.name != field]
    if others:
        raise spec.fail(f"{spec.datatype} data goes in contents.{field}, not {others[0]}")
    values = getattr(contents, field)
    if len(values) != spec.count:
        raise spec.fail(
            f"shape {list(spec.shape)} needs {spec.count} elements, contents.{field} has "
            f"{len(values)}"
        )
    if spec.datatype == "BYTES":
        return object_array(list(values)).reshape(spec.shape)
    return convert_flat(spec, list(values)).reshape(spec.shape)


def _requested(outputs: Any) -> list[RequestedOutput] | None:
    if not outputs:
        return None  # all of the model's outputs
    requested = []
    for index, output in enumerate(outputs):
        if not output.name:
            raise InvalidInput(f"outputs[{index}] has no 'name'")
        parameters = parameters_of(output.parameters)
        for key in UNSUPPORTED_TENSOR_PARAMETERS:
            if key in parameters:
                raise InvalidInput(f"output {output.name!r}: parameter {key!r} is not supported")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidInput(
                f"output {output.name!r}: parameter 'binary_data' must be a bool_param"
            )
        requested.append(RequestedOutput(name=output.name, binary=binary))
    once_each([o.name for o in requested], "output {!r} is requested more than once")
    return requested


def encode_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: dict[str, np.ndarray],
) -> Any:
    """ModelInferResponse: every output raw (Triton's way, and what tritonclient reads), or
    every output typed when the request asks binary_data false for all of them. Clients
    index raw_output_contents by output position, so one response never mixes the two."""
    selected = select_outputs(outputs, request.outputs, request.binary_output)
    raw = {binary for _, _, binary in selected}
    if len(raw) > 1:
        raise InvalidInput(
            "requested outputs mix binary_data true and false: raw_output_contents is used for "
            "all outputs or none"
        )
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version)
    if request.id is not None:
        response.id = request.id
    for name, array, binary in selected:
        datatype = output_datatype(name, array)
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if binary:
            response.raw_output_contents.append(encode_binary(name, array, datatype))
        else:
            _encode_typed(tensor, name, array, datatype)
    return response


def _encode_typed(tensor: Any, name: str, array: np.ndarray, datatype: str) -> None:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"output {name!r} is {datatype}, which only travels raw: request it raw")
    values = array.ravel(order="C").tolist()
    if datatype == "BYTES":  # onnxruntime returns str elements; the field holds bytes
        values = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
    getattr(tensor.contents, field).extend(values)
