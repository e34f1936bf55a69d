"""Dataset shift: corruptions of raw test inputs at increasing severities.

Each takes raw inputs ``[N, C, ...]``, a severity, the input spec and a generator, and returns
corrupted raw inputs; severity 0 returns the inputs unchanged. Evaluation reports
:func:`gaussian_noise`; the shift experiment runs every one of :data:`CORRUPTIONS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


def masking(
    x: torch.Tensor, severity: float, spec: InputSpec, generator: torch.Generator
) -> torch.Tensor:
    """Replace a random fraction ``severity`` of input features by the channel mean."""
    view = (-1,) + (1,) * (len(spec.shape) - 1)
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(view).expand_as(x[0])
    dropped = torch.rand(x.shape, generator=generator) < severity
    return torch.where(dropped, mean.expand_as(x), x)


def translation(
    x: torch.Tensor, severity: float, spec: InputSpec, generator: torch.Generator
) -> torch.Tensor:
    """Shift each 1-D signal by ``severity`` steps, left or right at random, edge-padded."""
    steps = round(severity)
    if steps == 0:
        return x.clone()
    length = x.shape[-1]
    signs = torch.randint(0, 2, (len(x),), generator=generator) * 2 - 1
    index = torch.arange(length)
    out = torch.empty_like(x)
    for sign in (-1, 1):
        chosen = signs == sign
        source = (index - sign * steps).clamp(0, length - 1)
        out[chosen] = x[chosen][..., source]
    return out


def blur(
    x: torch.Tensor, severity: float, spec: InputSpec, generator: torch.Generator
) -> torch.Tensor:
    """Gaussian blur of each 1-D signal with standard deviation ``severity`` steps."""
    if severity <= 0:
        return x.clone()
    radius = max(1, math.ceil(3 * severity))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / severity) ** 2)
    kernel = (kernel / kernel.sum()).view(1, 1, -1)
    flat = x.reshape(-1, 1, x.shape[-1])
    padded = torch.nn.functional.pad(flat, (radius, radius), mode="replicate")
    return torch.nn.functional.conv1d(padded, kernel).reshape(x.shape)


Corruption = Callable[[torch.Tensor, float, InputSpec, torch.Generator], torch.Tensor]

CORRUPTIONS: dict[str, tuple[Corruption, list[float], list[float], str]] = {
    "gaussian_noise": (
        gaussian_noise,
        [0.0, 0.1, 0.25, 0.5, 0.75, 1.0],
        [0.0, 0.5],
        "noise std, in data stds",
    ),
    "masking": (masking, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], [0.0, 0.3], "fraction masked"),
    "translation": (translation, [0, 2, 4, 6, 8, 10], [0, 4], "shift, steps"),
    "blur": (blur, [0.0, 0.5, 1.0, 1.5, 2.0, 3.0], [0.0, 1.5], "blur std, steps"),
}
"""name: (function, full severities, quick severities, what the severity measures)."""
