"""The ensemble as one ONNX graph run by ONNX Runtime.

A graph holds a fixed set of members (their weights are its initialisers), the input
normalisation, every member's forward pass, and for classification the pooling: inputs
``x`` (raw, ``[B, *input_shape]``) and ``temperature`` (a scalar), outputs
``member_outputs`` ``[S, B, ·]``, ``probs``, ``entropy``, ``expected_entropy`` and
``mutual_information``. One graph is exported per set of members on first use and cached.
ONNX Runtime runs on CUDA where the engine's device is CUDA, else on the CPU with as many
intra-op threads as torch has (``torch.get_num_threads()`` when the session is made), so a
replica's ``torch_threads`` bounds every engine alike; ONNX Runtime's own default is a thread
per core.

Needs ``onnxruntime`` (or ``onnxruntime-gpu``), ``onnx`` and ``onnxscript``, imported lazily.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from serving.engine.reference import ReferenceEngine
from serving.manifest import InputSpec
from serving.predictive import entropy, expected_entropy, mutual_information, pool

OUTPUTS = ("member_outputs", "probs", "entropy", "expected_entropy", "mutual_information")


class EnsembleGraph(nn.Module):
    """What is exported: normalisation, the members one after another, and the pooling."""

    def __init__(self, copies: Sequence[nn.Module], input_spec: InputSpec) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copies)
        view = (1, -1) + (1,) * (len(input_spec.shape) - 1)
        self.register_buffer("mean", torch.tensor(input_spec.mean).view(view))
        self.register_buffer("std", torch.tensor(input_spec.std).view(view))

    def forward(self, x: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = (x - self.mean) / self.std
        outputs = torch.stack([member(z) for member in self.copies])
        member_probs = torch.softmax(outputs / temperature, dim=-1)
        probs = pool(member_probs)
        return (
            outputs,
            probs,
            entropy(probs),
            expected_entropy(member_probs),
            mutual_information(member_probs),
        )


def export_graph(
    model: nn.Module, members: Sequence[dict[str, torch.Tensor]], input_spec: InputSpec
) -> bytes:
    """The serialised ONNX graph of ``members``, with a dynamic batch dimension."""
    copies = []
    for state in members:
        member = copy.deepcopy(model).cpu().eval()
        member.load_state_dict({k: v.cpu() for k, v in state.items()})
        copies.append(member)
    graph = EnsembleGraph(copies, input_spec).eval()
    example = (torch.zeros(2, *input_spec.shape), torch.tensor(1.0))
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        graph,
        example,
        input_names=["x", "temperature"],
        output_names=list(OUTPUTS),
        dynamic_shapes=({0: batch}, None),
        dynamo=True,
        optimize=True,
        verbose=False,
    )
    return program.model_proto.SerializeToString()


def check_providers(device: torch.device, available: Sequence[str]) -> None:
    """Refuse a CUDA device when ONNX Runtime cannot run on one, rather than fall back quietly.

    ONNX Runtime only warns when a session asks for a provider it lacks, and then runs on the
    CPU: an engine placed on CUDA would be served from the CPU without anybody noticing.
    """
    if device.type == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            "the onnx engine on a CUDA device needs onnxruntime-gpu; this onnxruntime offers "
            f"{', '.join(available)}. Install onnxruntime-gpu, or pick a torch engine."
        )


class OnnxEngine(ReferenceEngine):
    """Answers through ONNX Runtime sessions, one per set of members (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import onnxruntime

        self._ort = onnxruntime
        check_providers(self.device, onnxruntime.get_available_providers())
        self._sessions: dict[tuple[int, ...], Any] = {}
        self._lock = threading.Lock()

    @property
    def providers(self) -> list[str]:
        """The execution providers asked for: CUDA first on a CUDA device, then the CPU."""
        cuda = self.device.type == "cuda"
        return (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]

    def session_options(self) -> Any:
        """Sessions use torch's intra-op thread count and run their nodes one at a time."""
        options = self._ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        return options

    def session(self, members: Sequence[int]) -> Any:
        """The ONNX Runtime session of these members, exported on first use."""
        key = tuple(members)
        with self._lock:
            if key not in self._sessions:
                onnx = export_graph(self.model, [self.members[i] for i in key], self.input_spec)
                self._sessions[key] = self._ort.InferenceSession(
                    onnx, self.session_options(), providers=self.providers
                )
            return self._sessions[key]

    def run(
        self, x: torch.Tensor, members: Sequence[int] | None = None, temperature: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Every output of the graph (see :data:`OUTPUTS`) for a raw batch, on the CPU."""
        x = self.check_inputs(x).cpu()
        session = self.session(list(members) if members is not None else range(len(self)))
        parts = [
            session.run(
                None, {"x": part.numpy(), "temperature": np.array(temperature, dtype=np.float32)}
            )
            for part in x.split(self.chunk_size)
        ]
        return {
            name: torch.cat([torch.from_numpy(p[k]) for p in parts], dim=1 if k == 0 else 0)
            for k, name in enumerate(OUTPUTS)
        }

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, members: Sequence[int] | None = None) -> torch.Tensor:
        return self.run(x, members)["member_outputs"].to(self.device)
