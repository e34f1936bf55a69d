"""Random ESPRO bundles for the benchmarks, written like trained ones.

Vertices are independently initialised networks (the architecture's own initialisation), so
activations have realistic scales; calibration fields are set, so every answer goes through
prediction sets and abstention as a trained bundle's would.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from serving.architectures import create_model
from serving.bundle import write_bundle
from serving.manifest import (
    AbstentionSpec,
    ArchitectureSpec,
    ConformalSpec,
    DrawSpec,
    InputSpec,
    Manifest,
    SimplexSpec,
    Task,
    vertex_key,
)
from serving.simplex import sample_dirichlet


def simplex_bundle(
    path: Path,
    *,
    name: str,
    architecture: str,
    kwargs: dict[str, Any],
    input_shape: tuple[int, ...],
    num_outputs: int,
    simplexes: int,
    vertices: int,
    draws: int,
    seed: int = 0,
) -> Path:
    """A classifier of ``simplexes`` simplexes of ``vertices`` vertices, ``draws`` members
    drawn from each, written to ``path``; inputs are standardised per channel as (x - 0) / 1."""
    torch.manual_seed(seed)
    build = functools.partial(
        create_model, architecture, input_shape=input_shape, num_outputs=num_outputs, **kwargs
    )
    names = [name for name, _ in build().named_parameters()]
    tensors, specs = {}, []
    for m in range(simplexes):
        for j in range(vertices):
            for key, tensor in build().named_parameters():
                tensors[vertex_key(m, j, key)] = tensor.detach()
        alphas = sample_dirichlet(vertices, draws, torch.Generator().manual_seed(seed + m))
        members = tuple(DrawSpec(alpha=a.tolist()) for a in alphas)
        specs.append(SimplexSpec(num_vertices=vertices, draw_seed=seed + m, draws=members))
    channels = input_shape[0]
    manifest = Manifest(
        name=name,
        version="1",
        task=Task.CLASSIFICATION,
        architecture=ArchitectureSpec(name=architecture, kwargs=kwargs),
        input=InputSpec(shape=input_shape, mean=(0.0,) * channels, std=(1.0,) * channels),
        num_outputs=num_outputs,
        class_names=tuple(str(k) for k in range(num_outputs)),
        parameter_names=tuple(names),
        simplexes=tuple(specs),
        temperature=1.2,
        conformal=ConformalSpec(method="aps", coverage=0.9, threshold=0.8, num_calibration=500),
        abstention=AbstentionSpec(target_error=0.1, threshold=0.5, calibration_coverage=0.8),
    )
    return write_bundle(path, manifest, tensors)
