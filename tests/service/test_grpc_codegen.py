"""The committed gRPC modules are what ``python -m service.grpc.codegen`` writes from the
protos, and the protos are wire-compatible with Triton's: every message and field we
declare has the name, number, type and cardinality of tritonclient's own copy, and every
RPC the same path and message types."""

from __future__ import annotations

from typing import Any

import pytest

from service.grpc import codegen
from service.grpc.generated import grpc_service_pb2, model_config_pb2

triton_service = pytest.importorskip(
    "tritonclient.grpc.service_pb2", reason="tritonclient[grpc] is not installed"
)
triton_config = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def test_generated_modules_are_current() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) is not installed")
    for name, text in codegen.generate().items():
        committed = (codegen.GENERATED_DIR / name).read_text()
        assert committed == text, (
            f"service/grpc/generated/{name} is stale: run python -m service.grpc.codegen"
        )


def _messages(file: Any) -> list[Any]:
    found = []

    def walk(message: Any) -> None:
        found.append(message)
        for nested in message.nested_types:
            walk(nested)

    for message in file.message_types_by_name.values():
        walk(message)
    return found


def _field_key(field: Any) -> tuple[Any, ...]:
    return (
        field.name,
        field.number,
        field.type,
        field.is_repeated,
        field.message_type.full_name if field.message_type else None,
        field.enum_type.full_name if field.enum_type else None,
    )


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(grpc_service_pb2, triton_service), (model_config_pb2, triton_config)],
    ids=["grpc_service", "model_config"],
)
def test_messages_match_triton(ours: Any, theirs: Any) -> None:
    pool = theirs.DESCRIPTOR.pool
    messages = _messages(ours.DESCRIPTOR)
    assert len(messages) > 5
    for message in messages:
        triton = pool.FindMessageTypeByName(message.full_name)
        triton_fields = {f.number: _field_key(f) for f in triton.fields}
        for field in message.fields:
            assert triton_fields.get(field.number) == _field_key(field), (
                f"{message.full_name}.{field.name} differs from Triton's"
            )
        oneofs = {o.name: {f.name for f in o.fields} for o in triton.oneofs}
        for oneof in message.oneofs:
            assert {f.name for f in oneof.fields} <= oneofs[oneof.name]
    for enum in ours.DESCRIPTOR.enum_types_by_name.values():
        triton_enum = pool.FindEnumTypeByName(enum.full_name)
        assert {(v.name, v.number) for v in enum.values} <= {
            (v.name, v.number) for v in triton_enum.values
        }


def test_rpcs_match_triton() -> None:
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        triton = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            triton.input_type.full_name,
            triton.output_type.full_name,
        )
        assert (method.client_streaming, method.server_streaming) == (
            triton.client_streaming,
            triton.server_streaming,
        )
    served = {m.name for m in ours.methods}
    assert {"ModelInfer", "ModelStreamInfer", "ModelConfig", "RepositoryIndex"} <= served


def test_http_alone_never_imports_grpc() -> None:
    """grpcio and the generated modules load only when the gRPC port is on (service.app
    imports service.grpc.server in the lifespan): a child process, as this one has grpc."""
    import subprocess
    import sys

    code = (
        "import sys, service.app, service.front.dispatch, service.protocol.handlers; "
        "loaded = sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', "
        "'service.grpc'))); print(loaded); sys.exit(1 if loaded else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
