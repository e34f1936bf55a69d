"""Argument checks of the tensor functions that the server and the trainer share.

A failed check is a caller's bug, not a refusal of a user's input: it raises ``TypeError`` or
``ValueError``, never an :class:`~serving.errors.EsproError`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_floating(x: Tensor, name: str, *, ndim: int | None = None) -> None:
    """Check that ``x`` is a floating tensor with ``ndim`` dimensions (any, if ``None``, but at
    least one) and a non-empty last dimension. Values are not checked: on the serving path that
    would force a device sync.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a floating tensor, but got dtype {x.dtype}.")
    dims_ok = x.ndim >= 1 if ndim is None else x.ndim == ndim
    if not dims_ok or x.shape[-1] == 0:
        dims = "at least 1" if ndim is None else str(ndim)
        raise ValueError(
            f"Expected `{name}` to have {dims} dimension(s) and a non-empty last dimension, "
            f"but got shape {tuple(x.shape)}."
        )


def check_labels(labels: Tensor, probs: Tensor) -> None:
    """Check that ``labels`` is an integer tensor ``[N]`` of class indices for ``probs [N, C]``."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"Expected `labels` to be a torch.Tensor, but got {type(labels).__name__}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"Expected `labels` to be an integer tensor, but got dtype {labels.dtype}.")
    if labels.shape != probs.shape[:1]:
        raise ValueError(
            f"Expected `labels` to have shape {tuple(probs.shape[:1])} to match `probs` of shape "
            f"{tuple(probs.shape)}, but got {tuple(labels.shape)}."
        )
    if labels.numel() == 0:
        raise ValueError("Expected at least one instance, but got none.")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= probs.shape[-1]:
        raise ValueError(
            f"Expected `labels` in [0, {probs.shape[-1] - 1}], but got values in [{low}, {high}]."
        )
