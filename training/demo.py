"""The demo's last step: serve the bundle it trained and query it over HTTP and gRPC."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from serving.cli import format_records
from serving.manifest import Task
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.settings import AppConfig, LaunchConfig


def query_native(url: str, model: str, inputs: np.ndarray) -> dict:
    """``POST /v1/models/{model}/predict`` with the standard library."""
    request = urllib.request.Request(
        f"{url}/v1/models/{model}/predict",
        data=json.dumps({"inputs": inputs.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def query_grpc(target: str, model: str, inputs: np.ndarray) -> np.ndarray:
    """OIP ``ModelInfer`` over gRPC with raw tensor contents; returns the probabilities."""
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=x.shape)
        ],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")],
        raw_input_contents=[x.tobytes()],
    )
    with grpc.insecure_channel(target) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    shape = tuple(response.outputs[0].shape)
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(shape)


def serve_and_query(bundle: Path, inputs: np.ndarray, where: LaunchConfig | None = None) -> None:
    """Start the server on ``bundle``, print its answers to ``inputs``, and stop it."""
    from serving import launch

    where = where or LaunchConfig()
    print(f"\nespro serve {bundle}")
    launch.start(AppConfig(bundles=[str(bundle)]), where)
    try:
        url, target = f"http://{where.host}:{where.http_port}", f"{where.host}:{where.grpc_port}"
        manifest_name = json.loads((bundle / "manifest.json").read_text())["name"]
        answer = query_native(url, manifest_name, inputs)
        print(f"\nPOST {url}/v1/models/{manifest_name}/predict")
        print(f"{answer['model_name']} v{answer['model_version']} ({answer['bundle_sha256'][:12]})")
        print(format_records(answer["predictions"], Task.CLASSIFICATION))
        probs = query_grpc(target, manifest_name, inputs)
        http_probs = np.array([r["probabilities"] for r in answer["predictions"]])
        gap = float(np.abs(probs - http_probs).max())
        print(f"\ngRPC {target} ModelInfer: the same probabilities (largest difference {gap:.1e})")
    finally:
        launch.stop()
