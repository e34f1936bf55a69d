"""The training configuration: one pydantic model, read from YAML or TOML.

Unknown keys are errors, and every error names the field it is about, e.g.
``simplex.epochs: Input should be greater than 0``.
"""

from __future__ import annotations

import inspect
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.architectures import ARCHITECTURES
from serving.errors import describe_validation_error
from serving.manifest import ConformalMethod
from training.data import BuiltinData
from training.errors import ConfigError
from training.sources import SOURCES, DataConfig
from training.spro import OptimSettings

BUILTIN_CONFIGS = "configs"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelConfig(_Section):
    """The architecture every vertex shares."""

    architecture: str = "mlp"
    """A registered name (``mlp``, ``cnn``, ``vgg16``, ``resnet18``) or ``module:callable``."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    allow_custom: bool = False
    """Allow ``module:callable`` architectures, which run code named by the config."""

    @model_validator(mode="after")
    def _known(self) -> ModelConfig:
        if ":" in self.architecture:
            if not self.allow_custom:
                raise ValueError(
                    f"{self.architecture!r} is custom code: set model.allow_custom: true to run it"
                )
        elif self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; known: {', '.join(ARCHITECTURES)}"
            )
        else:
            accepted = set(inspect.signature(ARCHITECTURES[self.architecture]).parameters)
            unknown = sorted(set(self.kwargs) - (accepted - {"input_shape", "num_outputs"}))
            if unknown:
                raise ValueError(
                    f"unknown option(s) {unknown} for architecture {self.architecture!r}"
                )
        return self


class OptimConfig(_Section):
    """SGD with momentum and one cosine cycle."""

    epochs: int = Field(gt=0)
    lr: float = Field(gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    batch_size: int = Field(default=128, gt=0)

    def settings(self) -> OptimSettings:
        return OptimSettings(
            epochs=self.epochs,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
        )


class ModesConfig(OptimConfig):
    """The M independent SGD solutions the simplexes grow from."""

    epochs: int = Field(default=20, gt=0)
    lr: float = Field(default=0.05, gt=0)
    count: int = Field(default=3, gt=0)
    patience: int | None = Field(default=None, gt=0)
    """Stop a mode once its validation loss has not improved for this many epochs and keep
    its best epoch (``epochs`` is then the most it runs, and the cosine cycle spans them);
    ``None`` runs every epoch."""
    init: list[Path] = Field(default_factory=list)
    """Optional safetensors ``state_dict`` files that modes start from, in order."""

    @model_validator(mode="after")
    def _check_init(self) -> ModesConfig:
        if len(self.init) > self.count:
            raise ValueError(f"{len(self.init)} init files for {self.count} modes")
        return self


class LambdaSearchConfig(_Section):
    """The search for λ when the config leaves it out: simplexes are grown at the first
    ``modes`` modes for every value of ``grid`` and scored on the validation split."""

    grid: list[float] = Field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0], min_length=2)
    """Candidate values of λ, best spread on a log scale."""
    modes: int = Field(default=1, gt=0)
    """Modes searched at; the cost is ``len(grid) × modes`` simplexes."""

    @model_validator(mode="after")
    def _check_grid(self) -> LambdaSearchConfig:
        if any(value < 0 for value in self.grid) or len(set(self.grid)) != len(self.grid):
            raise ValueError("grid values must be distinct and non-negative")
        return self


class SimplexConfig(OptimConfig):
    """The extra vertices grown at each mode (SPRO)."""

    epochs: int = Field(default=5, gt=0)
    lr: float = Field(default=0.02, gt=0)
    vertices: int = Field(default=2, ge=0)
    """Extra vertices per mode: 0 gives a deep ensemble, k a k-simplex at each mode."""
    samples: int = Field(default=5, gt=0)
    """Points drawn per minibatch to estimate the expected loss over the simplex."""
    lam: float | None = Field(default=None, ge=0, alias="lambda")
    """Weight of the volume term ``λ log(h² + ε‖θ_0‖²)`` (:mod:`training.spro`); leave it
    out to choose it on the validation split (``search``)."""
    search: LambdaSearchConfig = Field(default_factory=LambdaSearchConfig)
    eps: float = Field(default=1e-4, gt=0)
    """Floor on the squared height, relative to the mode's squared norm (:mod:`training.spro`)."""


class DrawsConfig(_Section):
    """Members drawn from every simplex for prediction."""

    per_simplex: int = Field(default=5, gt=0)
    batchnorm_batches: int = Field(default=50, gt=0)
    """Training batches used to recompute BatchNorm statistics for each draw."""


class CalibrationConfig(_Section):
    """Held-out calibration of the pooled prediction."""

    temperature: bool = True
    conformal_method: ConformalMethod = ConformalMethod.APS
    coverage: float = Field(default=0.9, gt=0, lt=1)
    abstention_target_error: float = Field(default=0.05, gt=0, lt=1)


class EvaluationConfig(_Section):
    """Test-set evaluation, clean and under Gaussian-noise shift."""

    noise_severities: list[float] = Field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 1.0])
    """Noise standard deviations, in units of the normalised input (per-channel std)."""


class BudgetConfig(_Section):
    """A training budget that ``espro train`` spends as the validation split says is best:
    on more modes, or on simplexes of some order at fewer modes (:mod:`training.budget`)."""

    mode_epochs: float | None = Field(default=None, gt=0)
    """Forward-backward passes worth this many epochs of one mode over the training split."""
    seconds: float | None = Field(default=None, gt=0)
    """Wall seconds, turned into passes at the rate the first mode trained."""
    vertex_epochs: list[int] = Field(default_factory=list)
    """Epochs per added vertex to try besides ``simplex.epochs``."""

    @model_validator(mode="after")
    def _one_unit(self) -> BudgetConfig:
        if (self.mode_epochs is None) == (self.seconds is None):
            raise ValueError("give exactly one of mode_epochs and seconds")
        return self


class TrainConfig(_Section):
    """Everything ``espro train`` needs; every field has a documented default."""

    name: str = Field(default="espro", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: str = Field(default="1", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    device: str = Field(default="cpu", pattern=r"^(cpu|auto|cuda(:\d+)?)$")
    """Where to train: ``cpu``, ``cuda``, ``cuda:N``, or ``auto`` (CUDA when available)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Arithmetic of the training forward passes: ``bf16`` runs them under ``torch.autocast``
    (losses, optimiser and the bundle's weights stay float32)."""
    data: DataConfig = Field(default_factory=BuiltinData)
    """Where the data come from: a built-in data set or a ``source`` of :mod:`training.sources`."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    modes: ModesConfig = Field(default_factory=ModesConfig)
    simplex: SimplexConfig = Field(default_factory=SimplexConfig)
    draws: DrawsConfig = Field(default_factory=DrawsConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    budget: BudgetConfig | None = None
    """Choose the number of modes and the order of the simplexes within this budget; then
    ``simplex.vertices`` is the highest order tried and ``modes.count`` is not used."""


def _without_source_tags(err: ValidationError) -> ValidationError:
    """``err`` with ``data.name`` where pydantic says ``data.builtin.name``: the data source it
    puts in the path is the section's own ``source`` key, not a field."""
    errors = [
        {**e, "loc": e["loc"][:1] + e["loc"][2:]}
        if e["loc"][:1] == ("data",) and len(e["loc"]) > 1 and e["loc"][1] in SOURCES
        else e
        for e in err.errors(include_url=False)
    ]
    return ValidationError.from_exception_data(err.title, errors)  # type: ignore[arg-type]


def parse_config(data: Any, source: str = "config") -> TrainConfig:
    """Validate a mapping as a :class:`TrainConfig`, naming every bad field in the error."""
    try:
        return TrainConfig.model_validate(data if data is not None else {})
    except ValidationError as err:
        message = describe_validation_error(_without_source_tags(err))
        raise ConfigError(f"{source}: {message}") from None


def builtin_configs() -> dict[str, Path]:
    """The configs shipped with espro, by name (file stem)."""
    folder = resources.files("training") / BUILTIN_CONFIGS
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml")
    }


def load_config(path_or_name: str | Path) -> TrainConfig:
    """Read a YAML or TOML config file, or a built-in config by name."""
    path = Path(path_or_name)
    if not path.exists():
        builtin = builtin_configs()
        if str(path_or_name) not in builtin:
            raise ConfigError(
                f"{path_or_name}: no such file and no built-in config of that name "
                f"(built-in: {', '.join(sorted(builtin))})"
            )
        path = builtin[str(path_or_name)]
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"{path}: expected a .yaml, .yml or .toml file")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: cannot parse: {err}") from None
    return parse_config(data, str(path))
