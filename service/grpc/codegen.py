"""Regenerates service/grpc/generated from service/grpc/proto: ``python -m service.grpc.codegen``.

The generated modules are committed (the runtime image needs no compiler) and
tests/service/test_grpc_codegen.py fails when they differ from what this writes. Needs
grpcio-tools (the dev extra pins the version whose protoc wrote the committed files).

Two edits to protoc's output, both for living beside other copies of these protos:
- imports relative to the package (protoc writes top-level ``import model_config_pb2``);
- a descriptor pool of our own instead of protobuf's default one. tritonclient and KServe's
  client register the same ``inference.*`` names in the default pool, and a second, different
  definition there is an import error: a process that imports both (the test suite) would break.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent / "proto"
GENERATED_DIR = Path(__file__).resolve().parent / "generated"
PROTOS = ("model_config.proto", "grpc_service.proto")
MODULES = ("model_config_pb2.py", "grpc_service_pb2.py", "grpc_service_pb2_grpc.py")
_EDITS = (
    ("import model_config_pb2 as", "from . import model_config_pb2 as"),
    ("import grpc_service_pb2 as", "from . import grpc_service_pb2 as"),
    ("_descriptor_pool.Default().AddSerializedFile", "_pool.POOL.AddSerializedFile"),
    (
        "from google.protobuf.internal import builder as _builder\n",
        "from google.protobuf.internal import builder as _builder\nfrom . import _pool\n",
    ),
)


def generate() -> dict[str, str]:
    """Module file name -> source, as protoc writes it plus the edits above."""
    from grpc_tools import protoc  # dev/build dependency only

    with tempfile.TemporaryDirectory() as out:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *PROTOS,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        sources = {}
        for name in MODULES:
            text = (Path(out) / name).read_text()
            for old, new in _EDITS:
                text = text.replace(old, new)
            sources[name] = text
    return sources


def main() -> int:
    for name, text in generate().items():
        (GENERATED_DIR / name).write_text(text)
        print(f"wrote {GENERATED_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
