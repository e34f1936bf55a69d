"""Image augmentation for SGD batches: random crops of padded images and horizontal flips.

This is the CIFAR recipe of the paper (pad 4, crop back to size, flip half the images). It is
applied to raw batches ``[B, C, H, W]`` before normalisation, on the training device, with the
vertex's seeded generator, so a run is reproducible whatever loads the images. Only SGD batches
are augmented: BatchNorm statistics and every evaluation read the images as they are.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class AugmentConfig(BaseModel):
    """Augmentation of training images (off unless set)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    crop_padding: int = Field(default=0, ge=0)
    """Zero-pad each side by this many pixels, then crop a random window of the image's size."""
    flip: bool = False
    """Mirror each image left to right with probability 0.5."""

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augmented copies of raw images ``x`` ``[B, C, H, W]``; draws come from ``generator``."""
        batch, channels, height, width = x.shape
        if self.crop_padding:
            pad = self.crop_padding
            offsets = torch.randint(0, 2 * pad + 1, (2, batch, 1), generator=generator)
            rows = (offsets[0] + torch.arange(height)).to(x.device)
            cols = (offsets[1] + torch.arange(width)).to(x.device)
            padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
            x = padded[
                torch.arange(batch, device=x.device)[:, None, None, None],
                torch.arange(channels, device=x.device)[None, :, None, None],
                rows[:, None, :, None],
                cols[:, None, None, :],
            ]
        if self.flip:
            flipped = (torch.rand(batch, generator=generator) < 0.5).to(x.device)
            x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
        return x
