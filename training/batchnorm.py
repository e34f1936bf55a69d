"""BatchNorm statistics for a drawn member, recomputed on training batches and then frozen.

A point inside a simplex is a network no one trained, so the running statistics of any vertex
are wrong for it. Following Garipov et al. (2018), the statistics are reset and re-estimated
as an exact (cumulative) average over a number of training batches in train mode. The batches
are the training inputs as they are, never augmented: the statistics are those of the data the
member will be asked about.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


def batchnorm_modules(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of a module that track running statistics, by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, BATCHNORM_TYPES) and m.track_running_stats
    }


def batchnorm_buffer_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the buffers that hold BatchNorm running statistics."""
    prefixes = tuple(f"{name}." if name else "" for name in batchnorm_modules(model))
    return tuple(
        n
        for n, _ in model.named_buffers()
        if any(n.startswith(p) and "." not in n[len(p) :] for p in prefixes)
    )


@contextmanager
def _cumulative_average(modules: Mapping[str, nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    saved = {name: m.momentum for name, m in modules.items()}
    try:
        for m in modules.values():
            m.momentum = None
        yield
    finally:
        for name, m in modules.items():
            m.momentum = saved[name]


@torch.no_grad()
def recompute_batchnorm(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    batches: Iterable[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Fresh BatchNorm statistics of ``model`` under ``params`` estimated on ``batches`` of
    normalised inputs (read only where the model has BatchNorm).

    Returns new buffers (the ones given are not modified). Models without BatchNorm get
    their buffers back unchanged.
    """
    modules = batchnorm_modules(model)
    fresh = {k: v.clone() for k, v in buffers.items()}
    if not modules:
        return fresh
    for name in batchnorm_buffer_names(model):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "running_var":
            fresh[name].fill_(1.0)
        else:
            fresh[name].zero_()
    was_training = model.training
    model.train()
    try:
        with _cumulative_average(modules):
            for x in batches:
                functional_call(model, (dict(params), fresh), (x,))
    finally:
        model.train(was_training)
    return fresh
