"""Regenerate the checked-in gRPC modules: ``python -m serving.proto.generate``.

Needs ``grpcio-tools`` (a development dependency). The proto is compiled with the repository
root as include path, so its descriptor name is ``serving/proto/grpc_predict_v2.proto`` and
protoc itself writes ``from serving.proto import grpc_predict_v2_pb2`` into the service module.

The message module is then pointed at a private descriptor pool instead of protobuf's default
one: tritonclient's ``grpc_service.proto`` defines the same ``inference.*`` symbols (it must,
for the wire contract), and two files defining one symbol in the default pool make whichever
is imported second fail with "duplicate symbol". Messages, serialisation and the gRPC service
path (``/inference.GRPCInferenceService/...``) do not depend on the pool.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "serving" / "proto" / "grpc_predict_v2.proto"
MESSAGES = PROTO.with_name("grpc_predict_v2_pb2.py")
DEFAULT_POOL = "_descriptor_pool.Default()"
PRIVATE_POOL = "_descriptor_pool.DescriptorPool()"


def use_private_pool(source: str) -> str:
    """The generated message module with its descriptors added to a pool of their own."""
    if source.count(DEFAULT_POOL) != 1:
        raise RuntimeError(
            f"expected exactly one {DEFAULT_POOL} in the generated {MESSAGES.name}; "
            "protoc's output format changed, update serving/proto/generate.py"
        )
    return source.replace(DEFAULT_POOL, PRIVATE_POOL)


def main() -> None:
    from grpc_tools import protoc

    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={ROOT}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            str(PROTO),
        ]
    )
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    MESSAGES.write_text(use_private_pool(MESSAGES.read_text()))


if __name__ == "__main__":
    main()
