"""Engines: ways to compute every member's outputs, chosen by a configuration string.

Every engine satisfies :class:`~serving.engine.base.Engine`: it answers a raw batch with the
outputs ``[S, B, ·]`` of any subset of its members. The string is ``NAME[:OPTION,...]``:

=============  ================================================================================
``reference``  one ``functional_call`` per member (:mod:`.reference`); the others build on it
``fused``      members stacked and run at once by ``torch.func.vmap`` (:mod:`.fused`)
``shortcut``   ``fused``, with the first layer computed once per vertex and mixed (:mod:`.shortcut`)
``onnx``       the ensemble exported as one ONNX graph, run by ONNX Runtime (:mod:`.onnx`)
``auto``       per range of batch sizes, the fastest of the others on the bundle (:mod:`.auto`)
=============  ================================================================================

Options of ``fused`` and ``shortcut``: ``bf16`` or ``fp16`` (weights and activations in that
precision, outputs in float32), ``graphs`` (CUDA graphs for batches up to 64) and ``compile``
(the stacked forward compiled by ``torch.compile``); the last two apply on CUDA only and are
ignored on the CPU. Example: ``fused:bf16,graphs``. ``auto`` times fp32 engines only;
``auto:bf16`` (or ``fp16``) also times ``fused`` and ``shortcut`` in that precision.

This module imports neither torch nor ONNX Runtime: settings validate strings with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn

    from serving.engine.base import Engine, MemberState
    from serving.manifest import InputSpec

ENGINES = ("reference", "fused", "shortcut", "onnx", "auto")
PRECISIONS = ("fp32", "bf16", "fp16")
_OPTIONS = {
    "fused": {"bf16", "fp16", "graphs", "compile"},
    "shortcut": {"bf16", "fp16", "graphs", "compile"},
    "auto": {"bf16", "fp16"},
}


@dataclass(frozen=True)
class EngineSpec:
    """A parsed engine string."""

    name: str
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    cuda_graphs: bool = False
    torch_compile: bool = False

    def __str__(self) -> str:
        options = [self.precision] if self.precision != "fp32" else []
        options += ["graphs"] if self.cuda_graphs else []
        options += ["compile"] if self.torch_compile else []
        return f"{self.name}:{','.join(options)}" if options else self.name


def parse_engine(spec: str) -> EngineSpec:
    """Parse ``NAME[:OPTION,...]``; a ``ValueError`` names what is wrong."""
    name, _, rest = spec.partition(":")
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    options = [option for option in rest.split(",") if option]
    allowed = _OPTIONS.get(name, set())
    unknown = [option for option in options if option not in allowed]
    if unknown:
        hint = f"; {name} takes {', '.join(sorted(allowed))}" if allowed else ""
        raise ValueError(f"engine {name!r} has no option {unknown[0]!r}{hint}")
    precisions = [option for option in options if option in PRECISIONS]
    if len(precisions) > 1:
        raise ValueError(f"engine {spec!r} names more than one precision")
    precision = precisions[0] if precisions else "fp32"
    return EngineSpec(name, precision, "graphs" in options, "compile" in options)  # type: ignore[arg-type]


def create_engine(
    spec: EngineSpec | str,
    model: nn.Module,
    members: Sequence[MemberState],
    input_spec: InputSpec,
    **options: Any,
) -> Engine:
    """The engine ``spec`` over a module and its members' states. ``options`` are the engine
    class's keywords: ``device``, ``chunk_size``, ``vertices``, ``origins``, … (``auto`` also
    takes ``budget_s`` and the other keywords of :class:`~serving.engine.auto.AutoEngine`)."""
    spec = parse_engine(spec) if isinstance(spec, str) else spec
    if spec.name == "reference":
        from serving.engine.reference import ReferenceEngine

        return ReferenceEngine(model, members, input_spec, **options)
    if spec.name == "onnx":
        from serving.engine.onnx import OnnxEngine

        return OnnxEngine(model, members, input_spec, **options)
    if spec.name == "auto":
        from serving.engine.auto import AutoEngine

        return AutoEngine(model, members, input_spec, precision=spec.precision, **options)
    import torch

    from serving.engine.fused import FusedEngine
    from serving.engine.shortcut import ShortcutEngine

    engine = FusedEngine if spec.name == "fused" else ShortcutEngine
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.precision]
    return engine(
        model,
        members,
        input_spec,
        dtype=dtype,
        cuda_graphs=spec.cuda_graphs,
        torch_compile=spec.torch_compile,
        **options,
    )
