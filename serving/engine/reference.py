"""The reference engine: one ``torch.func.functional_call`` per member.

Every member is a dictionary of parameters and buffers materialised once; a forward pass is a
``functional_call`` of the shared module under each member's state, so no module is copied per
member and no layer is rewritten. The other engines build on it and are tested against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from serving.engine.base import MemberState, Origin
from serving.errors import InputError
from serving.manifest import InputSpec


class ReferenceEngine:
    """A module and the states of its members, answering raw (unnormalised) inputs.

    ``vertices`` (the parameters of every simplex's vertices) and ``origins`` (one per member)
    are optional; engines that exploit the simplex structure need them.
    """

    def __init__(
        self,
        model: nn.Module,
        members: Sequence[MemberState],
        input_spec: InputSpec,
        *,
        device: str | torch.device = "cpu",
        chunk_size: int = 1024,
        vertices: Sequence[Sequence[MemberState]] = (),
        origins: Sequence[Origin | None] | None = None,
    ) -> None:
        if not members:
            raise ValueError("an engine needs at least one member")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if origins is not None and len(origins) != len(members):
            raise ValueError(f"{len(origins)} origins for {len(members)} members")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.members = [{k: v.to(self.device) for k, v in m.items()} for m in members]
        self.vertices = vertices
        self.origins: list[Origin | None] = list(origins or [None] * len(members))
        self.input_spec = input_spec
        self.chunk_size = chunk_size

    def __len__(self) -> int:
        return len(self.members)

    def add(self, member: MemberState, origin: Origin | None = None) -> int:
        """Materialise one more member on the engine's device; returns its index."""
        self.members.append({k: v.to(self.device) for k, v in member.items()})
        self.origins.append(origin)
        return len(self.members) - 1

    def check_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Validate a raw batch against the input spec and return it as float32."""
        shape = tuple(self.input_spec.shape)
        dims = ", ".join(map(str, shape))
        if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise InputError(f"expected inputs of shape [batch, {dims}], got {list(x.shape)}")
        if x.shape[0] == 0:
            raise InputError(f"the batch is empty; expected inputs of shape [batch, {dims}]")
        if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.uint8)):
            raise InputError(f"expected numeric inputs, got dtype {x.dtype}")
        x = x.to(torch.float32)
        if not torch.isfinite(x).all():
            raise InputError("inputs contain NaN or infinite values")
        return x

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, members: Sequence[int] | None = None) -> torch.Tensor:
        """Member outputs ``[S, B, num_outputs]`` for a raw batch ``[B, *input_shape]``."""
        x = self.input_spec.normalise(self.check_inputs(x).to(self.device))
        indices = list(members) if members is not None else list(range(len(self)))
        return torch.cat([self.forward(part, indices) for part in x.split(self.chunk_size)], dim=1)

    def forward(self, x: torch.Tensor, members: Sequence[int]) -> torch.Tensor:
        """Outputs ``[S, B, ·]`` of the chosen members for a normalised batch: one call each."""
        return torch.stack([functional_call(self.model, self.members[i], (x,)) for i in members])
