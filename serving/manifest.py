"""The bundle manifest: a pydantic schema kept apart from the code that reads the tensors.

A bundle is a directory holding ``manifest.json`` and ``vertices.safetensors``. The manifest
says how to rebuild the network (architecture and input spec), which simplexes the complex
holds, which points were drawn from each (Dirichlet coordinates and their seed), how to turn
member outputs into a calibrated prediction, and the sha256 of every other file. Every number
in it is finite.

Tensor names inside ``vertices.safetensors`` follow :func:`vertex_key`, :func:`buffer_key`
and :func:`draw_buffer_key`.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
"""Bumped whenever a reader of the previous version would misread a new bundle."""

MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "vertices.safetensors"

MAX_INSTANCE_ELEMENTS = 2**28
"""The most numbers one instance may hold (1 GiB of float32): a bundle's input shape is
allocated as is, when a server warms up, before any request says otherwise."""


class Task(StrEnum):
    """What the network predicts."""

    CLASSIFICATION = "classification"
    """Logits over classes; members are pooled in probability space."""
    REGRESSION = "regression"
    """A Gaussian per member (mean and raw scale); members form a mixture."""


class ConformalMethod(StrEnum):
    """How a class is scored against an instance; a lower score means a better fit."""

    APS = "aps"
    """Adaptive prediction sets, deterministic: the score of a class is the total probability
    of the classes ranked above it (randomised APS with ``u = 0``). The top class scores 0, so
    a set is never empty, and sets grow in rank order. Equal probabilities are ranked by class
    index (the lower index first)."""
    LAC = "lac"
    """Least ambiguous classifier: one minus the class's probability. Smallest sets on average;
    a set is empty when no class is probable enough (an instance unlike the calibration data)."""


def vertex_key(simplex: int, vertex: int, name: str) -> str:
    """Tensor name of parameter ``name`` of vertex ``vertex`` of simplex ``simplex``."""
    return f"simplex.{simplex}.vertex.{vertex}.{name}"


def buffer_key(simplex: int, name: str) -> str:
    """Tensor name of buffer ``name`` shared by the draws of a simplex (its mode's buffers)."""
    return f"simplex.{simplex}.buffer.{name}"


def draw_buffer_key(simplex: int, draw: int, name: str) -> str:
    """Tensor name of the BatchNorm statistic ``name`` recomputed for one draw."""
    return f"simplex.{simplex}.draw.{draw}.{name}"


class _Strict(BaseModel):
    """Unknown fields and non-finite numbers are refused; a NaN or infinity in a free-form
    field (``metrics``, ``training``) is dumped as itself, for the writer to refuse, not as
    ``null``."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, ser_json_inf_nan="constants"
    )


class ArchitectureSpec(_Strict):
    """How to rebuild the network: a registered builder name (or ``module:callable``)."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


ImageFormat = Literal["png", "jpeg"]

DEFAULT_MAX_PIXELS = 2**24
"""The most pixels (width times height) an image may declare before it is decoded."""


class ImageSpec(_Strict):
    """How an encoded image becomes one raw instance, exactly as the trainer made it: decoded,
    converted to ``color``, scaled to [0, 1] and resized to ``size`` (antialiased bilinear).

    ``formats`` and ``max_pixels`` bound what a server decodes: a header declaring more pixels
    is refused before any pixel is allocated."""

    size: tuple[PositiveInt, PositiveInt]
    """``[height, width]``."""
    color: Literal["rgb", "grayscale"] = "rgb"
    formats: tuple[ImageFormat, ...] = Field(default=("png", "jpeg"), min_length=1)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)

    @property
    def channels(self) -> int:
        return 3 if self.color == "rgb" else 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of the instance an image becomes: ``[C, H, W]``."""
        return (self.channels, *self.size)


class InputSpec(_Strict):
    """Shape, dtype and normalisation of one instance, as a client sends it.

    Normalisation is ``(x - mean) / std``; for rank-1 inputs ``mean``/``std`` are per
    feature, for higher ranks per channel (dimension 0 of ``shape``).
    """

    shape: tuple[int, ...]
    dtype: Literal["float32"] = "float32"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image: ImageSpec | None = None
    """How encoded images become instances, for models trained on images; ``None``: the
    model takes arrays only."""

    @model_validator(mode="after")
    def _check(self) -> InputSpec:
        if self.image is not None and self.image.shape != tuple(self.shape):
            raise ValueError(
                f"image makes instances of shape {list(self.image.shape)}, "
                f"not the input shape {list(self.shape)}"
            )
        if not self.shape or any(d <= 0 for d in self.shape):
            raise ValueError(f"shape must be non-empty and positive, got {list(self.shape)}")
        if math.prod(self.shape) > MAX_INSTANCE_ELEMENTS:
            raise ValueError(f"shape holds more than {MAX_INSTANCE_ELEMENTS} numbers")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != self.shape[0]:
                raise ValueError(
                    f"{name} must have {self.shape[0]} entries (dimension 0 of shape), "
                    f"got {len(value)}"
                )
        if any(s <= 0 for s in self.std):
            raise ValueError("std entries must be finite and positive")
        return self

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a batch ``[B, *shape]`` of raw inputs."""
        view = (-1,) + (1,) * (len(self.shape) - 1)
        mean = x.new_tensor(self.mean).view(view)
        std = x.new_tensor(self.std).view(view)
        return (x - mean) / std


class DrawSpec(_Strict):
    """One member: a point of its simplex given by Dirichlet coordinates."""

    alpha: tuple[float, ...]
    batchnorm: bool = False
    """Whether the member has its own recomputed BatchNorm statistics in the tensor file."""

    @field_validator("alpha")
    @classmethod
    def _on_simplex(cls, alpha: tuple[float, ...]) -> tuple[float, ...]:
        if any(a < 0 for a in alpha) or abs(sum(alpha) - 1.0) > 1e-5:
            raise ValueError("alpha must be non-negative and sum to 1")
        return alpha


class SimplexSpec(_Strict):
    """A simplex grown from one mode: its vertices and the members drawn from it."""

    num_vertices: int = Field(ge=1)
    draw_seed: int
    draws: tuple[DrawSpec, ...] = Field(min_length=1)
    log_volume: float | None = None
    """log V² of the simplex (Cayley–Menger); ``None`` for a lone mode or a degenerate simplex."""

    @model_validator(mode="after")
    def _check(self) -> SimplexSpec:
        for i, draw in enumerate(self.draws):
            if len(draw.alpha) != self.num_vertices:
                raise ValueError(
                    f"draws[{i}].alpha has {len(draw.alpha)} coordinates for "
                    f"{self.num_vertices} vertices"
                )
        return self


class ConformalSpec(_Strict):
    """Split conformal prediction sets calibrated on a held-out split."""

    method: ConformalMethod
    coverage: float = Field(gt=0, lt=1)
    threshold: float | None
    """Score threshold; ``None`` when the calibration split is too small for the coverage,
    in which case every class is in every set."""
    num_calibration: int = Field(ge=1)

    @property
    def score_threshold(self) -> float:
        """The threshold to compare conformity scores with (``inf``: every class)."""
        return math.inf if self.threshold is None else self.threshold


class AbstentionSpec(_Strict):
    """Abstain when the pooled confidence is below ``threshold``."""

    target_error: float = Field(gt=0, lt=1)
    threshold: float | None
    """Confidence threshold; ``None`` when no threshold reaches the target error on the
    calibration split, in which case every instance abstains."""
    calibration_coverage: float = Field(ge=0, le=1)
    """Fraction of the calibration split that the threshold keeps."""

    @property
    def confidence_threshold(self) -> float:
        """The threshold to compare confidences with (``inf``: always abstain)."""
        return math.inf if self.threshold is None else self.threshold


class Manifest(_Strict):
    """Everything needed to rebuild, verify and run a complex of simplexes."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    task: Task
    architecture: ArchitectureSpec
    input: InputSpec
    num_outputs: int = Field(ge=1)
    class_names: tuple[str, ...] = ()
    parameter_names: tuple[str, ...] = Field(min_length=1)
    buffer_names: tuple[str, ...] = ()
    batchnorm_buffer_names: tuple[str, ...] = ()
    simplexes: tuple[SimplexSpec, ...] = Field(min_length=1)
    temperature: float = Field(default=1.0, gt=0)
    """Classification: member logits are divided by it. Regression: variances are scaled."""
    conformal: ConformalSpec | None = None
    abstention: AbstentionSpec | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)
    """sha256 (hex) of every file of the bundle except the manifest itself."""

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        if self.task is Task.CLASSIFICATION and len(self.class_names) != self.num_outputs:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries for {self.num_outputs} outputs"
            )
        if self.task is Task.REGRESSION and self.num_outputs != 2:
            raise ValueError("regression networks output (mean, raw scale): num_outputs must be 2")
        if not set(self.batchnorm_buffer_names) <= set(self.buffer_names):
            raise ValueError("batchnorm_buffer_names must be a subset of buffer_names")
        for i, simplex in enumerate(self.simplexes):
            if any(d.batchnorm for d in simplex.draws) and not self.batchnorm_buffer_names:
                raise ValueError(f"simplexes[{i}] has BatchNorm draws but the model has none")
        return self

    def tensor_names(self) -> dict[str, str]:
        """Every tensor name the tensor file must hold, and nothing else, each with the name of
        the network's parameter or buffer it is a value of."""
        names: dict[str, str] = {}
        for m, simplex in enumerate(self.simplexes):
            for j in range(simplex.num_vertices):
                names |= {vertex_key(m, j, n): n for n in self.parameter_names}
            names |= {buffer_key(m, n): n for n in self.buffer_names}
            for s, draw in enumerate(simplex.draws):
                if draw.batchnorm:
                    names |= {draw_buffer_key(m, s, n): n for n in self.batchnorm_buffer_names}
        return names

    def tensor_keys(self) -> set[str]:
        """Every tensor name the tensor file must hold, and nothing else."""
        return set(self.tensor_names())
