"""Regenerate the checked-in gRPC modules: ``python -m espro_client._proto.generate``.

Needs ``grpcio-tools``. The proto is compiled with ``src/`` as include path, so protoc writes
``from espro_client._proto import grpc_predict_v2_pb2`` into the service module. The message
module is then pointed at a private descriptor pool: the server's stubs and tritonclient's
define the same ``inference.*`` symbols, and two files defining one symbol in protobuf's
default pool make whichever is imported second fail with "duplicate symbol". Messages,
serialisation and the service path (``/inference.GRPCInferenceService/...``) do not depend on
the pool (with protobuf's default upb backend).
"""

from __future__ import annotations

from pathlib import Path

SRC = Path(__file__).resolve().parents[2]
PROTO = Path("espro_client/_proto/grpc_predict_v2.proto")
MESSAGES = PROTO.with_name("grpc_predict_v2_pb2.py")
DEFAULT_POOL = "_descriptor_pool.Default()"
PRIVATE_POOL = "_descriptor_pool.DescriptorPool()"


def use_private_pool(source: str) -> str:
    """The generated message module with its descriptors added to a pool of their own."""
    if source.count(DEFAULT_POOL) != 1:
        raise RuntimeError(
            f"expected exactly one {DEFAULT_POOL} in the generated {MESSAGES.name}; "
            "protoc's output changed, update espro_client/_proto/generate.py"
        )
    return source.replace(DEFAULT_POOL, PRIVATE_POOL)


def generate(out_dir: Path = SRC) -> None:
    """Write the modules under ``out_dir / espro_client/_proto`` (default: the checked-in ones)."""
    from grpc_tools import protoc

    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={SRC}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(SRC / PROTO),
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}")
    messages = out_dir / MESSAGES
    messages.write_text(use_private_pool(messages.read_text()))


if __name__ == "__main__":
    generate()
