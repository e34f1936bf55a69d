"""The exact first-layer shortcut: mix the vertices' first-layer outputs instead of the weights.

A member's weights are ``θ = Σ_j α_j θ_j`` over its simplex's vertices, and a Linear or
Convolution layer is linear in its weight and bias jointly, so its output under ``θ`` is
``Σ_j α_j f(x; θ_j)``. For that layer the engine computes V vertex outputs per simplex and
mixes them with one matrix multiply, instead of computing S member outputs: cheaper whenever
a simplex has fewer vertices than the draws taken from it (V < K). The layers after it run
fused (:mod:`serving.engine.fused`). Only a network that is a (nested) ``nn.Sequential``
whose first layer holding tensors is exactly ``nn.Linear`` or ``nn.ConvNd`` qualifies; any
other network, any set of members with V ≥ K, or any member of unknown origin runs fused.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from serving.engine.base import MemberState
from serving.engine.fused import FusedEngine, Prepared, map_members

LINEAR_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

Layer = tuple[str, nn.Module, tuple[str, ...]]
"""A leaf module: its qualified name, the module, and the names of its tensors."""


def sequential_layers(model: nn.Module, prefix: str = "") -> Iterator[Layer]:
    """The leaves of a tree of ``nn.Sequential``, in order (a non-Sequential model is one leaf)."""
    if isinstance(model, nn.Sequential):
        for name, child in model.named_children():
            yield from sequential_layers(child, f"{prefix}{name}.")
        return
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    yield prefix.removesuffix("."), model, tuple(names)


def split_at_first_layer(model: nn.Module) -> tuple[list[Layer], Layer, list[Layer]] | None:
    """``(before, first, after)`` around the first layer holding tensors, where that layer is
    exactly a Linear or Conv layer without buffers; ``None`` where the shortcut is not exact."""
    layers = list(sequential_layers(model))
    for i, layer in enumerate(layers):
        _, module, names = layer
        if names:
            exact = type(module) in LINEAR_LAYERS and not list(module.buffers())
            return (layers[:i], layer, layers[i + 1 :]) if exact else None
    return None


def _call(layer: Layer, state: MemberState, x: torch.Tensor) -> torch.Tensor:
    name, module, names = layer
    if not names:
        return module(x)
    return functional_call(module, {n: state[f"{name}.{n}"] for n in names}, (x,))


@dataclass(frozen=True)
class _Mixed:
    """A prepared shortcut: the used vertices' first layers, the mixing matrix, the members."""

    vertices: dict[str, torch.Tensor]
    """First-layer tensors of the used vertices, stacked ``[V, ...]``."""
    alpha: torch.Tensor
    """``[S, V]``: row s holds member s's coordinates over its simplex's vertices."""
    members: dict[str, torch.Tensor]


class ShortcutEngine(FusedEngine):
    """A fused engine that computes an exact first layer once per vertex.

    Needs ``vertices`` and the members' ``origins`` (see :class:`~serving.engine.base.Origin`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        split = split_at_first_layer(self.model) if self.vertices else None
        self.applies = split is not None
        """Whether the network's first layer qualifies and the vertices are known."""
        if split is not None:
            self._before, self._first, self._after = split
            self._vertex_layer = vmap(functools.partial(_call, self._first), in_dims=(0, None))

    def _tail(self, state: MemberState, h: torch.Tensor) -> torch.Tensor:
        for layer in self._after:
            h = _call(layer, state, h)
        return h

    def mixes(self, members: Sequence[int]) -> bool:
        """Whether these members run the shortcut: it applies, every origin is known, and
        their simplexes have fewer vertices than there are members (V < K; else mixing
        outputs costs more than it saves, and they run fused)."""
        origins = [self.origins[i] for i in members]
        if not self.applies or any(origin is None for origin in origins):
            return False
        simplexes = {origin.simplex for origin in origins if origin is not None}
        return sum(len(self.vertices[m]) for m in simplexes) < len(origins)

    def prepare(self, members: tuple[int, ...]) -> Prepared:
        if not self.mixes(members):
            return super().prepare(members)
        known = [origin for i in members if (origin := self.origins[i]) is not None]
        starts: dict[int, int] = {}  # where each used simplex's vertices start
        num_vertices = 0
        for m in sorted({origin.simplex for origin in known}):
            starts[m] = num_vertices
            num_vertices += len(self.vertices[m])
        alpha = torch.zeros(len(members), num_vertices, dtype=torch.float64)
        for row, origin in enumerate(known):
            start = starts[origin.simplex]
            alpha[row, start : start + len(origin.alpha)] = torch.tensor(origin.alpha)
        name, _, names = self._first
        keys = [f"{name}.{n}" for n in names]
        vertices = {k: torch.stack([v[k] for m in starts for v in self.vertices[m]]) for k in keys}
        return _Mixed(
            vertices={n: t.to(self.device, self.dtype) for n, t in vertices.items()},
            alpha=alpha.to(self.device, self.dtype),
            members=self.stack(members),
        )

    def run(self, prepared: Prepared, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(prepared, _Mixed):
            return super().run(prepared, x)
        for layer in self._before:
            x = _call(layer, {}, x)
        per_vertex = self._vertex_layer(prepared.vertices, x)  # [V, B, ...]
        mixed = (prepared.alpha @ per_vertex.flatten(1)).view(-1, *per_vertex.shape[1:])
        return map_members(
            self._tail,
            prepared.members,
            mixed,
            per_member_input=True,
            vectorise=self.vectorise(len(x)),
        )
