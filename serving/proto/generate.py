"""Regenerate the checked-in gRPC modules: ``python -m serving.proto.generate``.

Needs ``grpcio-tools`` (a development dependency). The proto is compiled with the repository
root as include path, so its descriptor name is ``serving/proto/grpc_predict_v2.proto`` and
protoc itself writes ``from serving.proto import grpc_predict_v2_pb2`` into the service module.

The message module is then pointed at a private descriptor pool instead of protobuf's default
one: tritonclient's ``grpc_service.proto`` defines the same ``inference.*`` symbols (it must,
for the wire contract), and two files defining one symbol in the default pool make whichever
is imported second fail with "duplicate symbol". Messages, serialisation and the gRPC service
path (``/inference.GRPCInferenceService/...``) do not depend on the pool. This holds for
protobuf's default (upb) backend; the pure-Python one (``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=
python``) also registers every message class in the default pool, so there the two files still
cannot share a process.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("serving/proto/grpc_predict_v2.proto")
MESSAGES = PROTO.with_name("grpc_predict_v2_pb2.py")
DEFAULT_POOL = "_descriptor_pool.Default()"
PRIVATE_POOL = "_descriptor_pool.DescriptorPool()"


def use_private_pool(source: str) -> str:
    """The generated message module with its descriptors added to a pool of their own."""
    if source.count(DEFAULT_POOL) != 1:
        raise RuntimeError(
            f"expected exactly one {DEFAULT_POOL} in the generated {MESSAGES.name}; "
            "protoc's output changed, update serving/proto/generate.py"
        )
    return source.replace(DEFAULT_POOL, PRIVATE_POOL)


def generate(out_dir: Path = ROOT) -> None:
    """Write the modules under ``out_dir / serving/proto`` (the checked-in ones by default)."""
    from grpc_tools import protoc

    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={ROOT}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(ROOT / PROTO),
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}")
    messages = out_dir / MESSAGES
    messages.write_text(use_private_pool(messages.read_text()))


if __name__ == "__main__":
    generate()
