"""What training spends, counted so that methods can be compared at equal cost.

Wall seconds depend on the machine and on what else it runs; example passes do not. A
forward-backward pass of one example through the network is the unit of training: an SGD
step of a mode over a batch of B examples costs B, and a SPRO step that averages the loss of
S points of the simplex costs S·B. Forward-only passes (scoring a validation split, recomputing
BatchNorm statistics, calibration) are counted apart, since they cost about a third of one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Cost:
    """Example passes and wall seconds of one piece of training."""

    passes: int = 0
    """Forward-backward example passes."""
    forward: int = 0
    """Forward-only example passes."""
    seconds: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.passes + other.passes, self.forward + other.forward, self.seconds + other.seconds
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cost:
        return cls(int(data["passes"]), int(data["forward"]), float(data["seconds"]))


@dataclass(frozen=True)
class VertexRecord:
    """How the training of one vertex ended and what it cost."""

    cost: Cost
    epochs: int
    """Epochs run (fewer than configured when a mode stopped early)."""
    final_loss: float
    """Mean training loss of its last epoch."""

    def as_dict(self) -> dict[str, Any]:
        return {**self.cost.as_dict(), "epochs": self.epochs, "final_loss": self.final_loss}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VertexRecord:
        return cls(Cost.from_dict(data), int(data["epochs"]), float(data["final_loss"]))


def total(costs: Iterable[Cost]) -> Cost:
    """The sum of ``costs`` (nothing costs nothing)."""
    return sum(costs, Cost())


PHASES = (
    "modes",
    "vertices",
    "lambda_search",
    "selection",
    "batchnorm",
    "diagnostics",
    "calibration",
    "total",
)
"""The phases of ``espro train`` in the order they run, as the manifest names them."""


def cost_table(phases: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table of a manifest's ``training["cost"]``, one row per phase."""
    lines = ["| phase | fwd-bwd passes | forward passes | seconds |", "|---|---:|---:|---:|"]
    for phase in sorted(phases, key=lambda p: PHASES.index(p) if p in PHASES else len(PHASES)):
        c = Cost.from_dict(phases[phase])
        lines.append(f"| {phase} | {c.passes:,} | {c.forward:,} | {c.seconds:.1f} |")
    return "\n".join(lines)
