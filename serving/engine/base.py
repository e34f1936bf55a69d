"""What every engine offers, and the types engines share.

An engine holds one architecture and the states of its members and answers raw inputs with
member outputs. :class:`~serving.predictor.Predictor` relies on :class:`Engine` alone, so an
engine may compute the outputs however it likes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

MemberState = Mapping[str, torch.Tensor]
"""A member's parameters and buffers, by the names of the architecture's state dict."""


@dataclass(frozen=True)
class Origin:
    """Where a member lies: its simplex and its coordinates, ``θ = Σ_j alpha_j θ_j``."""

    simplex: int
    alpha: tuple[float, ...]


@runtime_checkable
class Engine(Protocol):
    """Member outputs of raw inputs, for any subset of the members it holds."""

    def __len__(self) -> int:
        """The members held."""
        ...

    def add(self, member: MemberState, origin: Origin | None = None) -> int:
        """Hold one more member (``origin`` unknown: ``None``); returns its index."""
        ...

    def check_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A raw batch validated against the input spec, as float32; refused with an
        :class:`~serving.errors.InputError` that says what is wrong."""
        ...

    def outputs(self, x: torch.Tensor, members: Sequence[int] | None = None) -> torch.Tensor:
        """Outputs ``[S, B, ·]`` of the chosen members (all when ``None``), in that order, for
        a raw batch ``[B, *input_shape]``, on the engine's device."""
        ...
