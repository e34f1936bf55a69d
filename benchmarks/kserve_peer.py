"""The KServe peer of ``benchmarks/serving_load.py``: an espro bundle behind KServe's
``ModelServer``, served the way a KServe custom model would serve it.

Per request, every member runs one forward pass on the request's inputs and the answer is the
mean of their softmax (``probabilities``, the OIP output espro also sends). There is no batching
across requests: that is KServe's ``ModelServer`` as shipped. It speaks OIP v2 over REST (JSON
and the binary tensor extension) and gRPC, bound to 127.0.0.1.

It needs its own virtual environment: kserve's protobuf pins clash with tritonclient's in one
process. Create it as ``benchmarks/kserve-requirements.txt`` says, then::

    .venv-kserve/bin/python benchmarks/kserve_peer.py BUNDLE --http-port 28500 --grpc-port 28501
"""

from __future__ import annotations

import argparse
import types
from typing import Any

import torch
from grpc import aio
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve import model_server as kserve_model_server
from kserve.protocol.grpc import server as kserve_grpc_server
from kserve.protocol.rest.server import RESTServer
from kserve.utils.utils import generate_uuid

from serving.bundle import Bundle, load_bundle
from serving.predictor import build_model
from serving.simplex import mix_vertices

HOST = "127.0.0.1"


def member_networks(bundle: Bundle) -> list[torch.nn.Module]:
    """One network per member (simplex × draw), its weights mixed from its simplex's vertices."""
    manifest = bundle.manifest
    networks = []
    for m, simplex in enumerate(manifest.simplexes):
        vertices = bundle.vertices(m)
        for s, draw in enumerate(simplex.draws):
            network = build_model(manifest)
            network.load_state_dict({**mix_vertices(vertices, draw.alpha), **bundle.buffers(m, s)})
            networks.append(network.eval())
    return networks


class MemberLoop(Model):
    """A KServe model answering the mean softmax of a bundle's members, one member at a time."""

    def __init__(self, bundle_path: str, device: str = "cpu") -> None:
        self.bundle = load_bundle(bundle_path)
        super().__init__(self.bundle.manifest.name)
        self.device = torch.device(device)
        self.members: list[torch.nn.Module] = []

    def load(self) -> bool:
        self.members = [network.to(self.device) for network in member_networks(self.bundle)]
        self.ready = True
        return self.ready

    @torch.inference_mode()
    def predict(self, payload: InferRequest, headers: Any = None) -> InferResponse:
        manifest = self.bundle.manifest
        x = torch.from_numpy(payload.inputs[0].as_numpy()).to(self.device, torch.float32)
        x = manifest.input.normalise(x)
        probabilities = torch.stack(
            [(network(x) / manifest.temperature).softmax(-1) for network in self.members]
        ).mean(0)
        binary = payload.use_binary_outputs
        output = InferOutput("probabilities", list(probabilities.shape), "FP32")
        output.set_data_from_numpy(probabilities.cpu().numpy(), binary_data=binary)
        return InferResponse(
            response_id=payload.id or generate_uuid(),  # KServe's JSON answer needs an id
            model_name=self.name,
            infer_outputs=[output],
            use_binary_outputs=binary,
        )


class LoopbackRESTServer(RESTServer):
    """KServe's REST server, bound to 127.0.0.1 (KServe hard-codes 0.0.0.0)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = HOST


def loopback_grpc_server(*args: Any, **kwargs: Any) -> aio.Server:
    """``grpc.aio.server`` whose ports bind to 127.0.0.1 (KServe hard-codes ``[::]``)."""
    server = aio.server(*args, **kwargs)
    bind = server.add_insecure_port
    server.add_insecure_port = lambda address: bind(f"{HOST}:{address.rsplit(':', 1)[1]}")
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--http-port", type=int, default=28500)
    parser.add_argument("--grpc-port", type=int, default=28501)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="torch device of the members")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kserve_model_server.RESTServer = LoopbackRESTServer
    kserve_grpc_server.aio = types.SimpleNamespace(server=loopback_grpc_server)
    model = MemberLoop(args.bundle, args.device)
    model.load()
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1).start([model])


if __name__ == "__main__":
    main()
