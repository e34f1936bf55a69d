"""The MLServer peer of ``benchmarks/serving_load.py``: an espro bundle behind Seldon MLServer
with its adaptive batching, served the way an MLServer custom runtime would serve it.

Inference is espro's own :class:`~serving.predictor.Predictor` with the engine espro's server
would use (``--engine``, default ``auto``), so only the serving stack differs. MLServer's
batcher groups up to ``--max-batch-size`` requests, waiting at most ``--max-batch-time-ms``
for more, concatenates their inputs along the first axis (a request's shape is
``[rows, *input_shape]``) and splits the answer by each request's rows, so every request gets
its own rows of ``probabilities`` (FP32, rows × classes).

``parallel_workers`` is 1, MLServer's default: the REST and gRPC servers and the batcher run in
the main process, inference in one worker process with ``--threads`` torch threads, like
espro's replica (one process, N torch threads) behind Serve's proxy. 0 would run inference on
the servers' event loop, and 2 or more would add inference processes.

Everything binds to 127.0.0.1. MLServer's metrics server (a third port) is off, and so is its
debug logging, a line per request, unless ``--debug``, which also logs each batch's rows. It
speaks OIP v2 over REST JSON and gRPC (``raw_input_contents`` too); MLServer has no REST binary
tensor extension: FastAPI refuses such a body, and MLServer's handler of that error fails on its
bytes, so the answer is a 500. SIGTERM stops it cleanly.

It needs its own virtual environment: mlserver pins fastapi and starlette below espro's. Create
it as ``benchmarks/mlserver-requirements.txt`` says, then::

    .venv-mlserver/bin/python benchmarks/mlserver_peer.py BUNDLE --http-port 28600 --grpc-port 28601
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import torch
from mlserver import MLModel, MLServer
from mlserver.codecs import NumpyCodec
from mlserver.logging import logger
from mlserver.settings import ModelParameters, ModelSettings, Settings
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import install_uvloop_event_loop

from serving.bundle import read_manifest
from serving.predictor import Predictor

HOST = "127.0.0.1"
IMPLEMENTATION = f"{Path(__file__).stem}.EsproModel"
"""How the worker process imports the model class (this script's directory is on its path)."""


class EsproModel(MLModel):
    """An MLServer model answering espro's calibrated probabilities for each batch."""

    async def load(self) -> bool:
        parameters = self.settings.parameters
        extra = parameters.extra
        torch.set_num_threads(extra["threads"])
        self.predictor = Predictor.from_path(
            parameters.uri, engine=extra["engine"], device=extra["device"]
        )
        self.predictor.warm_up()  # an ONNX export takes seconds: not on a request
        engine, threads = self.predictor.describe_engine(), torch.get_num_threads()
        logger.info("%s engine %s, %d torch threads", self.name, engine, threads)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = torch.from_numpy(NumpyCodec.decode_input(payload.inputs[0]))
        logger.debug("a batch of %d rows", len(x))
        probabilities = self.predictor.predict(x).probs.numpy()
        output = NumpyCodec.encode_output("probabilities", probabilities)
        return InferenceResponse(model_name=self.name, outputs=[output])


def server_settings(args: argparse.Namespace, scratch: Path) -> Settings:
    """Loopback ports, one inference worker, no metrics server; MLServer's files in
    ``scratch`` (by default it writes them into the working directory)."""
    return Settings(
        debug=args.debug,
        host=HOST,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        parallel_workers=1,
        metrics_endpoint=None,
        metrics_dir=str(scratch / "metrics"),
        environments_dir=str(scratch / "envs"),
        model_repository_root=str(scratch),
    )


def model_settings(args: argparse.Namespace) -> ModelSettings:
    """The bundle as an MLServer model named as its manifest names it, batched adaptively."""
    manifest, _ = read_manifest(args.bundle)
    return ModelSettings(
        name=manifest.name,
        implementation=IMPLEMENTATION,
        max_batch_size=args.max_batch_size,
        max_batch_time=args.max_batch_time_ms / 1000,
        parameters=ModelParameters(
            uri=str(Path(args.bundle).resolve()),
            extra={"engine": args.engine, "threads": args.threads, "device": args.device},
        ),
    )


async def serve(settings: Settings, model: ModelSettings) -> None:
    """Run MLServer until SIGINT or SIGTERM (its own handlers stop it)."""
    await MLServer(settings).start([model])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--http-port", type=int, default=28600)
    parser.add_argument("--grpc-port", type=int, default=28601)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--engine", default="auto", help="espro's engine (serving.engine)")
    parser.add_argument("--device", default="cpu", help="the engine's torch device")
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests per batch")
    parser.add_argument("--max-batch-time-ms", type=float, default=2.0)
    parser.add_argument("--debug", action="store_true", help="MLServer's debug logging")
    args = parser.parse_args(argv)
    install_uvloop_event_loop()
    with tempfile.TemporaryDirectory(prefix="mlserver-peer-") as scratch:
        asyncio.run(serve(server_settings(args, Path(scratch)), model_settings(args)))


if __name__ == "__main__":
    main()
