"""A registry of network builders, keyed by name as in timm.

Every builder takes the keyword arguments ``input_shape`` (one instance's shape, without the
batch dimension) and ``num_outputs``, plus options of its own with defaults::

    model = create_model("cnn", input_shape=(1, 40), num_outputs=10, channels=(16, 32))

A name of the form ``"package.module:callable"`` builds a network from user code. That executes
code named by a bundle, so :func:`create_model` refuses it unless ``allow_custom=True``.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch import nn

__all__ = ["ARCHITECTURES", "Builder", "create_model", "register_architecture"]

Builder = Callable[..., nn.Module]

ARCHITECTURES: dict[str, Builder] = {}

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_AVG_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}

# VGG-16, configuration "D" of Simonyan & Zisserman: output channels, "M" for a 2x2 max pool.
_VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


def register_architecture(fn: Builder) -> Builder:
    """Register ``fn`` as an architecture under its function name (a decorator)."""
    if fn.__name__ in ARCHITECTURES:
        raise ValueError(f"architecture {fn.__name__!r} is already registered")
    ARCHITECTURES[fn.__name__] = fn
    return fn


def create_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    allow_custom: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build the architecture ``name`` for inputs of ``input_shape`` and ``num_outputs`` outputs.

    ``name`` is a registered architecture or, with ``allow_custom=True``, a
    ``"package.module:callable"`` that is imported and called with the same arguments.
    ``kwargs`` are the builder's own options.
    """
    input_shape = tuple(int(size) for size in input_shape)
    if not input_shape or min(input_shape) < 1:
        raise ValueError(f"input_shape must be non-empty and positive, got {input_shape}")
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be positive, got {num_outputs}")
    builder = _resolve(name, allow_custom=allow_custom)
    model = builder(input_shape=input_shape, num_outputs=num_outputs, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"architecture {name!r} returned {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


def _resolve(name: str, *, allow_custom: bool) -> Builder:
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if ":" not in name:
        raise ValueError(
            f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)} "
            "(or a custom 'package.module:callable')"
        )
    if not allow_custom:
        raise ValueError(
            f"custom architecture {name!r} executes code named by the bundle and must be "
            "allowed explicitly (allow_custom=True / --allow-custom-architecture)"
        )
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
        builder = functools.reduce(getattr, attribute.split("."), module)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot load custom architecture {name!r}: {err}") from err
    if not callable(builder):
        raise TypeError(f"custom architecture {name!r} is not callable")
    return builder


def _spatial_dims(name: str, input_shape: tuple[int, ...], allowed: Sequence[int]) -> int:
    """The number of spatial dimensions of a channels-first ``input_shape``, checked."""
    dims = len(input_shape) - 1
    if dims not in allowed:
        expected = " or ".join(str(d + 1) for d in allowed)
        raise ValueError(
            f"{name} expects a channels-first input_shape of rank {expected}, got {input_shape}"
        )
    return dims


def _mlp_layers(widths: Sequence[int], num_outputs: int) -> list[nn.Module]:
    """Linear/ReLU blocks through ``widths``, then a Linear layer to ``num_outputs``."""
    layers: list[nn.Module] = []
    for width_in, width_out in itertools.pairwise(widths):
        layers += [nn.Linear(width_in, width_out), nn.ReLU(inplace=True)]
    return [*layers, nn.Linear(widths[-1], num_outputs)]


@register_architecture
def mlp(
    *, input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (256, 256)
) -> nn.Sequential:
    """A multilayer perceptron on the flattened input."""
    return nn.Sequential(nn.Flatten(), *_mlp_layers([math.prod(input_shape), *hidden], num_outputs))


@register_architecture
def cnn(
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    channels: Sequence[int] = (32, 64),
    kernel_size: int = 3,
    hidden: int = 128,
    head: Literal["avg", "flatten"] = "avg",
) -> nn.Sequential:
    """A small CNN: conv-ReLU-maxpool blocks, then a hidden layer and the outputs.

    ``input_shape`` ``[C, L]`` gives 1-D convolutions, ``[C, H, W]`` 2-D convolutions.
    ``head="avg"`` averages the features over positions (global average pooling);
    ``"flatten"`` keeps position: the hidden layer reads every feature at every position.
    """
    dims = _spatial_dims("cnn", tuple(input_shape), allowed=(1, 2))
    if head not in ("avg", "flatten"):
        raise ValueError(f"cnn head must be 'avg' or 'flatten', got {head!r}")
    conv, max_pool = _CONV[dims], _MAX_POOL[dims]
    blocks: list[nn.Module] = []
    sizes = list(input_shape[1:])
    for width_in, width_out in itertools.pairwise([input_shape[0], *channels]):
        blocks += [
            conv(width_in, width_out, kernel_size, padding=kernel_size // 2),
            nn.ReLU(inplace=True),
            max_pool(2, ceil_mode=True),  # ceil_mode keeps a size-1 input valid
        ]
        # The convolution keeps an odd kernel's size (an even one's plus one); the pool halves it.
        sizes = [-(-(size + 2 * (kernel_size // 2) - kernel_size + 1) // 2) for size in sizes]
    pool = _AVG_POOL[dims](1) if head == "avg" else nn.Identity()
    features = channels[-1] * (math.prod(sizes) if head == "flatten" else 1)
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*blocks),
            pool=pool,
            flatten=nn.Flatten(),
            classifier=nn.Sequential(*_mlp_layers([features, hidden], num_outputs)),
        )
    )


@register_architecture
def vgg16(*, input_shape: Sequence[int], num_outputs: int, dropout: float = 0.5) -> nn.Sequential:
    """VGG-16 without BatchNorm, CIFAR style (as in Garipov et al.'s mode-connectivity code).

    Inputs need at least 32x32 pixels (five 2x2 max pools).
    """
    _spatial_dims("vgg16", tuple(input_shape), allowed=(2,))
    layers: list[nn.Module] = []
    width_in = input_shape[0]
    for item in _VGG16_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(2, stride=2))
        else:
            conv = nn.Conv2d(width_in, int(item), kernel_size=3, padding=1)
            # He initialisation over fan-out, zero bias, as in the reference code.
            fan_out = math.prod(conv.kernel_size) * conv.out_channels
            nn.init.normal_(conv.weight, std=math.sqrt(2.0 / fan_out))
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            width_in = int(item)
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*layers),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            classifier=nn.Sequential(
                nn.Dropout(dropout),
                nn.Linear(512, 512),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(512, 512),
                nn.ReLU(inplace=True),
                nn.Linear(512, num_outputs),
            ),
        )
    )


@register_architecture
def resnet18(
    *, input_shape: Sequence[int], num_outputs: int, small_input: bool = True
) -> nn.Module:
    """torchvision's ResNet-18, randomly initialised (weights are never downloaded).

    ``small_input`` swaps in the CIFAR stem: a 3x3 stride-1 first convolution and no max pool.
    """
    from torchvision.models import resnet18 as torchvision_resnet18  # seconds to import

    _spatial_dims("resnet18", tuple(input_shape), allowed=(2,))
    model = torchvision_resnet18(weights=None, num_classes=num_outputs)
    in_channels = input_shape[0]
    if small_input or in_channels != model.conv1.in_channels:
        kernel_size, stride, padding = (3, 1, 1) if small_input else (7, 2, 3)
        model.conv1 = nn.Conv2d(
            in_channels, 64, kernel_size, stride=stride, padding=padding, bias=False
        )
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if small_input:
        model.maxpool = nn.Identity()
    return model
