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
    buffer_key,
    draw_buffer_key,
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
    drawn from each, written to ``path``; inputs are standardised per channel as (x - 0) / 1.
    A network with BatchNorm gives every member statistics of its own (:func:`member_buffers`),
    as ESPRO's recomputed ones are."""
    torch.manual_seed(seed)
    build = functools.partial(
        create_model, architecture, input_shape=input_shape, num_outputs=num_outputs, **kwargs
    )
    model = build()
    names = [name for name, _ in model.named_parameters()]
    buffers = {name: tensor.detach() for name, tensor in model.named_buffers()}
    batchnorm = tuple(n for n in buffers if n.endswith(("running_mean", "running_var")))
    statistics = torch.Generator().manual_seed(seed + 1)  # the global stream is untouched
    tensors, specs = {}, []
    for m in range(simplexes):
        for j in range(vertices):
            for key, tensor in build().named_parameters():
                tensors[vertex_key(m, j, key)] = tensor.detach()
        tensors |= {buffer_key(m, n): tensor.clone() for n, tensor in buffers.items()}
        alphas = sample_dirichlet(vertices, draws, torch.Generator().manual_seed(seed + m))
        for s in range(draws if batchnorm else 0):
            own = member_buffers(buffers, statistics)
            tensors |= {draw_buffer_key(m, s, n): own[n] for n in batchnorm}
        members = tuple(DrawSpec(alpha=a.tolist(), batchnorm=bool(batchnorm)) for a in alphas)
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
        buffer_names=tuple(buffers),
        batchnorm_buffer_names=batchnorm,
        simplexes=tuple(specs),
        temperature=1.2,
        conformal=ConformalSpec(method="aps", coverage=0.9, threshold=0.8, num_calibration=500),
        abstention=AbstentionSpec(target_error=0.1, threshold=0.5, calibration_coverage=0.8),
    )
    return write_bundle(path, manifest, tensors)


def member_buffers(
    buffers: dict[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """One member's buffers: the initial ones with the BatchNorm statistics perturbed, running
    means by N(0, 0.1²) and running variances by U(0, 0.5), so every member normalises with
    statistics of its own (as ESPRO's recomputed ones are); others (``num_batches_tracked``)
    as they are. Members drawn from one ``generator`` in turn get the same statistics for
    any number of members."""
    out = {}
    for name, tensor in buffers.items():
        if name.endswith("running_mean"):
            tensor = tensor + 0.1 * torch.randn(tensor.shape, generator=generator)
        elif name.endswith("running_var"):
            tensor = tensor + 0.5 * torch.rand(tensor.shape, generator=generator)
        out[name] = tensor.detach().clone()
    return out
