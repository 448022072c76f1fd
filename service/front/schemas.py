"""JSON schemas of the REST bodies, for the OpenAPI document only.

The codecs (service.protocol) parse bodies by hand for speed and precise messages; these
describe the same shapes for readers and for tools that generate requests from the
document (schemathesis in tests/service/test_fuzz.py).
"""

from __future__ import annotations

from typing import Any

from service.datatypes import DATATYPE_TO_NUMPY

_STRING = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_PARAMETERS = {"type": "object", "additionalProperties": True}
_TENSOR_META: dict[str, Any] = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": _STRING,
        "datatype": {"type": "string", "enum": list(DATATYPE_TO_NUMPY)},
        "shape": {"type": "array", "items": {"type": "integer"}},
    },
}


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _object(["error"], error=_STRING),
    "Live": _object(["live"], live=_BOOL),
    "Ready": _object(["ready"], ready=_BOOL),
    "ServerMetadata": _object(
        ["name", "version", "extensions"],
        name=_STRING,
        version=_STRING,
        extensions={"type": "array", "items": _STRING},
    ),
    "TensorMetadata": _TENSOR_META,
    "ModelMetadata": _object(
        ["name", "platform", "inputs", "outputs"],
        name=_STRING,
        versions={"type": "array", "items": _STRING},
        platform=_STRING,
        inputs={"type": "array", "items": _ref("TensorMetadata")},
        outputs={"type": "array", "items": _ref("TensorMetadata")},
        parameters=_PARAMETERS,
    ),
    "ModelReady": _object(["name", "ready"], name=_STRING, ready=_BOOL),
    "ModelConfig": {"type": "object", "description": "Triton's model configuration (JSON)."},
    "Statistics": _object(["model_stats"], model_stats={"type": "array", "items": _PARAMETERS}),
    "RepositoryIndexRequest": _object([], ready=_BOOL),
    "RepositoryLoadRequest": _object(
        [],
        parameters=_object(
            [],
            config={
                "type": "string",
                "description": "Triton model configuration as JSON, overriding "
                "max_batch_size, dynamic_batching (max_queue_delay_microseconds, "
                "default_queue_policy.max_queue_size) and version_policy for this load.",
            },
        ),
    ),
    "RepositoryUnloadRequest": _object([], parameters=_PARAMETERS),
    "Empty": {"type": "object"},
    "RepositoryIndex": {
        "type": "array",
        "items": _object(
            ["name", "state"], name=_STRING, version=_STRING, state=_STRING, reason=_STRING
        ),
    },
    "InferenceRequest": _object(
        ["inputs"],
        id=_STRING,
        parameters=_PARAMETERS,
        inputs={
            "type": "array",
            "items": {
                **_TENSOR_META,
                "properties": {
                    **_TENSOR_META["properties"],
                    "parameters": _PARAMETERS,
                    "data": {"type": "array", "description": "Row-major, flat or nested."},
                },
            },
        },
        outputs={
            "type": "array",
            "items": _object(["name"], name=_STRING, parameters=_PARAMETERS),
        },
    ),
    "InferenceResponse": _object(
        ["model_name", "id", "outputs"],
        model_name=_STRING,
        model_version=_STRING,
        id=_STRING,
        parameters=_PARAMETERS,
        outputs={
            "type": "array",
            "items": {
                **_TENSOR_META,
                "properties": {
                    **_TENSOR_META["properties"],
                    "parameters": _PARAMETERS,
                    "data": {"type": "array"},
                },
            },
        },
    ),
    "V1Models": _object(["models"], models={"type": "array", "items": _STRING}),
    "V1ModelStatus": _object(
        ["name", "ready"], name=_STRING, ready=_BOOL, version=_STRING, labels={"type": "array"}
    ),
    "V1PredictRequest": {
        "type": "object",
        "description": 'Exactly one of "instances" (row form) or "inputs" (columnar form).',
        "properties": {"instances": {"type": "array"}, "inputs": {}},
    },
    "V1PredictResponse": _object(["predictions"], predictions={"type": "array"}),
}
