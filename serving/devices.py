"""The torch device a command line or config names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from serving.errors import DeviceError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str, source: str = "device") -> torch.device:
    """The device ``name`` names: ``cpu``, ``cuda``, ``cuda:N``, or ``auto`` for CUDA where
    there is one. A :class:`~serving.errors.DeviceError` naming ``source`` (a flag or a config
    field) refuses a name that is no device, and CUDA where there is none."""
    import torch  # seconds to import: not for the commands that need no device

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch.device's own parse error
        raise DeviceError(
            f"{source}: {name!r} is not a device (cpu, cuda, cuda:N or auto)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        message = f"{source}: device {name!r} was asked for but CUDA is not available here"
        raise DeviceError(message)
    return device
