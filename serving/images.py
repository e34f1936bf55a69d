"""Encoded images to raw instances, the one implementation the trainer and the server share, so
that what was trained is what is served.

An image is decoded with :func:`torchvision.io.decode_image`, converted to RGB or grayscale,
scaled to [0, 1] and resized with antialiased bilinear interpolation (:func:`to_instance`).
Before that, :func:`decode_images` checks what a client sent: its format, sniffed from its
first bytes, must be one the bundle declares (else 415), and the width and height its header
declares, read here since torchvision has no header-only reader, must stay within the
bundle's ``max_pixels`` (else 413), so that a small file claiming a huge image allocates
nothing. Whatever else fails to decode is a 400.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections.abc import Sequence

import torch

from serving.errors import ServiceError
from serving.manifest import ImageSpec

MAX_BATCH_ELEMENTS = 2**28
"""The most numbers the instances of one request's images may hold (1 GiB of float32): a tiny
file decodes to a full-size instance, so the count of images is bounded by what they become."""

_PNG = b"\x89PNG\r\n\x1a\n"
_SIGNATURES = {
    "png": (_PNG,),
    "jpeg": (b"\xff\xd8\xff",),
    "gif": (b"GIF87a", b"GIF89a"),
    "webp": (b"RIFF",),
    "bmp": (b"BM",),
    "tiff": (b"II*\0", b"MM\0*"),
}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
"""JPEG start-of-frame markers: their segment holds the image's height and width."""


def sniff(data: bytes) -> str | None:
    """The image format whose signature ``data`` starts with, or ``None``."""
    for name, signatures in _SIGNATURES.items():
        if data.startswith(signatures) and (name != "webp" or data[8:12] == b"WEBP"):
            return name
    return None


def dimensions(data: bytes, kind: str) -> tuple[int, int] | None:
    """``(width, height)`` as a PNG's IHDR or a JPEG's start-of-frame declares them, or
    ``None`` when the header is cut short or malformed."""
    if kind == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        return struct.unpack(">II", data[16:24])
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no segment follows
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SOF:
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        if marker in (0xD9, 0xDA) or length < 2:  # the end, or scan data before any frame
            return None
        pos += 2 + length
    return None


def to_instance(encoded: torch.Tensor, size: tuple[int, int], color: str) -> torch.Tensor:
    """One encoded image (uint8 bytes) as float32 ``[C, H, W]`` in [0, 1], ``[H, W] = size``.
    Raises torchvision's ``RuntimeError`` or ``ValueError`` for data it cannot decode."""
    from torchvision.io import ImageReadMode, decode_image  # seconds to import

    mode = ImageReadMode.RGB if color == "rgb" else ImageReadMode.GRAY
    image = decode_image(encoded, mode=mode)
    x = image.to(torch.float32) / torch.iinfo(image.dtype).max
    if tuple(x.shape[1:]) != tuple(size):
        x = torch.nn.functional.interpolate(
            x[None], size=size, mode="bilinear", antialias=True, align_corners=False
        )[0]
    return x


def decode_reason(err: Exception) -> str:
    """torchvision's message without the function and C++ source line it starts with."""
    return re.sub(r"^\w+, \S+:\d+, ", "", str(err)).split(". ")[0]


def decode_images(encoded: Sequence[bytes], spec: ImageSpec) -> torch.Tensor:
    """Encoded images as raw float32 instances ``[N, *spec.shape]`` in [0, 1].

    Raises :class:`~serving.errors.ServiceError`: 415 for a format the bundle does not take,
    413 for an image past ``max_pixels`` or a request past :data:`MAX_BATCH_ELEMENTS`, 400 for
    no image or one that does not decode; each message names the image by its index."""
    if not encoded:
        raise ServiceError(400, "no images: send at least one")
    per_image = spec.channels * spec.size[0] * spec.size[1]
    if len(encoded) * per_image > MAX_BATCH_ELEMENTS:
        raise ServiceError(
            413,
            f"{len(encoded)} images are too many for one request: at most "
            f"{MAX_BATCH_ELEMENTS // per_image} of this model's size",
        )
    for i, data in enumerate(encoded):
        _check_header(i, data, spec)
    out = torch.empty(len(encoded), *spec.shape)
    for i, data in enumerate(encoded):
        try:
            out[i] = to_instance(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), spec.size, spec.color
            )
        except (RuntimeError, ValueError) as err:
            raise ServiceError(400, f"image {i}: cannot decode it: {decode_reason(err)}") from None
    return out


def _check_header(i: int, data: bytes, spec: ImageSpec) -> None:
    kind = sniff(data)
    if kind not in spec.formats:
        found = "an unknown format" if kind is None else kind
        raise ServiceError(415, f"image {i} is {found}; this model takes {', '.join(spec.formats)}")
    size = dimensions(data, kind)
    if size is None:
        raise ServiceError(400, f"image {i}: its {kind} header is cut short or malformed")
    width, height = size
    if width * height > spec.max_pixels:
        raise ServiceError(
            413, f"image {i} is {width}x{height}, over this model's {spec.max_pixels} pixels"
        )


def from_base64(text: str | bytes, where: str) -> bytes:
    """Base64 text (an image in JSON) as bytes; ``where`` names it in a refusal (400)."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(
            400, f"{where} is not an image's base64 text (RFC 4648, padded)"
        ) from None
