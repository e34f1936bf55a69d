"""Dataset shift: corruptions applied to raw test inputs at increasing severities."""

from __future__ import annotations

import torch

from serving.manifest import InputSpec


def gaussian_noise(
    x: torch.Tensor, severity: float, input_spec: InputSpec, generator: torch.Generator
) -> torch.Tensor:
    """Add Gaussian noise whose standard deviation is ``severity`` per-channel stds of the data.

    ``severity`` is therefore in units of the normalised input: 1.0 adds noise as large as
    the data's own spread.
    """
    if severity < 0:
        raise ValueError(f"severity must be >= 0, got {severity}")
    view = (-1,) + (1,) * (len(input_spec.shape) - 1)
    std = torch.tensor(input_spec.std, dtype=x.dtype).view(view)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x + severity * std * noise
