"""The calibrated predictor: a verified bundle, its members materialised once, and the math.

Offline prediction, evaluation and the server all answer through :class:`Predictor`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from serving.architectures import create_model
from serving.bundle import Bundle, load_bundle
from serving.engine import EngineSpec, create_engine, parse_engine
from serving.engine.auto import AutoEngine
from serving.engine.base import MemberState, Origin
from serving.errors import BundleError, InputError
from serving.manifest import TENSORS_FILE, Manifest, Task
from serving.predictive import (
    ClassificationPrediction,
    RegressionPrediction,
    classify,
    regress,
)
from serving.quoting import quote
from serving.simplex import mix_vertices, sample_dirichlet

Prediction = ClassificationPrediction | RegressionPrediction


def build_model(manifest: Manifest, *, allow_custom_architecture: bool = False) -> torch.nn.Module:
    """Instantiate the bundle's architecture (weights are supplied per member)."""
    spec = manifest.architecture
    return create_model(
        spec.name,
        input_shape=manifest.input.shape,
        num_outputs=manifest.num_outputs,
        allow_custom=allow_custom_architecture,
        **spec.kwargs,
    )


def check_architecture(bundle: Bundle, *, allow_custom_architecture: bool = False) -> None:
    """Refuse a bundle whose architecture cannot be built or whose tensors do not fit it, with
    a :class:`~serving.errors.BundleError` naming the tensor.

    The network is built on the meta device, so the check allocates nothing whatever sizes
    the manifest's arguments ask for; the real network is built only for tensors that fit.
    """
    manifest = bundle.manifest
    name = manifest.architecture.name
    try:
        with torch.device("meta"):
            model = build_model(manifest, allow_custom_architecture=allow_custom_architecture)
    except Exception as err:  # the builder runs on the manifest's arguments: its failure is theirs
        raise BundleError(f"{bundle.path}: architecture {name!r} cannot be built: {err}") from err
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    if params.keys() != set(manifest.parameter_names) or buffers.keys() != set(
        manifest.buffer_names
    ):
        raise BundleError(
            f"{bundle.path}: architecture {name!r} does not match the bundle: "
            "its parameter or buffer names differ from the manifest's"
        )
    expected = params | buffers
    for key, state_name in manifest.tensor_names().items():
        got, want = bundle.tensors[key], expected[state_name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise BundleError(
                f"{bundle.path}: {TENSORS_FILE}: tensor {key} is {got.dtype} {list(got.shape)}; "
                f"architecture {name!r} expects {want.dtype} {list(want.shape)}"
            )


class Predictor:
    """Answers raw inputs with the pooled, calibrated prediction of every member of a bundle.

    A request may use fewer draws per simplex than the bundle stores; a bundle without buffers
    (no BatchNorm statistics to carry per draw) may also grant up to ``max_fresh_draws`` more,
    sampled uniformly on each simplex from a seed fixed by the bundle's hash, so every replica
    answers alike. Fresh members are materialised on first use and kept.

    ``engine`` chooses how member outputs are computed (see :mod:`serving.engine`); every
    engine answers the same probabilities, to float tolerance. Callers validate inputs, pick
    members and run them through the methods here, never through the engine itself.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str | torch.device = "cpu",
        allow_custom_architecture: bool = False,
        max_fresh_draws: int = 0,
        engine: EngineSpec | str = "reference",
    ) -> None:
        self.bundle = bundle
        self.max_fresh_draws = max_fresh_draws
        self._lock = threading.Lock()
        manifest = bundle.manifest
        check_architecture(bundle, allow_custom_architecture=allow_custom_architecture)
        model = build_model(manifest, allow_custom_architecture=allow_custom_architecture)
        members, origins, self._slots = [], [], []
        all_vertices = [bundle.vertices(m) for m in range(len(manifest.simplexes))]
        for m, (simplex, vertices) in enumerate(zip(manifest.simplexes, all_vertices, strict=True)):
            slots = []
            for s, draw in enumerate(simplex.draws):
                slots.append(len(members))
                members.append({**mix_vertices(vertices, draw.alpha), **bundle.buffers(m, s)})
                origins.append(Origin(m, draw.alpha))
            self._slots.append(slots)
        self._fresh: list[list[int]] = [[] for _ in self._slots]
        self.engine_spec = parse_engine(engine) if isinstance(engine, str) else engine
        self.engine = create_engine(
            self.engine_spec,
            model,
            members,
            manifest.input,
            device=device,
            vertices=all_vertices,
            origins=origins,
        )

    @classmethod
    def from_path(cls, path: str | Path, **kwargs: object) -> Predictor:
        """Load and verify a bundle, then build its predictor."""
        return cls(load_bundle(path), **kwargs)  # type: ignore[arg-type]

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def stored_draws(self) -> int:
        """The draws per simplex the bundle stores (the fewest over its simplexes)."""
        return min(len(slots) for slots in self._slots)

    @property
    def max_draws(self) -> int:
        """The most draws per simplex a request may ask for: stored plus fresh."""
        return self.stored_draws + self.max_fresh_draws

    @property
    def max_fresh_draws(self) -> int:
        return self._max_fresh_draws

    @max_fresh_draws.setter
    def max_fresh_draws(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"max_fresh_draws must be >= 0, got {value}")
        if value and self.manifest.buffer_names:
            raise ValueError(
                f"model {self.manifest.name!r} has buffers (BatchNorm statistics) stored per "
                "draw, so it cannot sample fresh draws; set max_fresh_draws to 0"
            )
        self._max_fresh_draws = value

    def member_indices(self, draws: int | None = None) -> list[int]:
        """Members to run: the first ``draws`` of every simplex (every stored one when ``None``),
        sampling fresh ones past a simplex's stored draws where that is allowed."""
        if draws is None:
            return [i for slots in self._slots for i in slots]
        if not 1 <= draws <= self.max_draws:
            hint = (
                " (a server may grant fresh draws with max_fresh_draws)"
                if not (self.max_fresh_draws or self.manifest.buffer_names)
                else ""
            )
            raise InputError(
                f"draws must be between 1 and {self.max_draws}, got {quote(draws)}{hint}"
            )
        indices = []
        for m, slots in enumerate(self._slots):
            fresh = draws - len(slots)
            indices += slots[:draws] + (self._fresh_members(m, fresh) if fresh > 0 else [])
        return indices

    def _fresh_members(self, m: int, count: int) -> list[int]:
        """The first ``count`` fresh members of simplex ``m``, materialised on first use.

        They come from a generator seeded by the bundle's hash and the simplex, and are
        regenerated as a prefix, so fresh draw ``j`` is the same whatever was asked first.
        """
        with self._lock:
            have = self._fresh[m]
            if len(have) < count:
                vertices = self.bundle.vertices(m)
                generator = torch.Generator().manual_seed(int(self.bundle.digest[:15], 16) + m)
                alphas = sample_dirichlet(len(vertices), count, generator)[len(have) :]
                for alpha in alphas:
                    origin = Origin(m, tuple(alpha.tolist()))
                    have.append(self.engine.add(mix_vertices(vertices, alpha), origin))
            return have[:count]

    def add_members(self, states: Sequence[MemberState]) -> list[int]:
        """Materialise members besides the bundle's (baselines to compare it with); returns
        their indices for :meth:`member_outputs`. Requests never reach them."""
        with self._lock:
            return [self.engine.add(state) for state in states]

    @property
    def num_members(self) -> int:
        """The members materialised: stored draws, fresh ones sampled so far, added ones."""
        return len(self.engine)

    @property
    def engine_choice(self) -> dict[str, str]:
        """The engine answering each range of batch rows, ``{"1-7": "fused", "8+": "onnx"}``:
        ``auto``'s choice, or the one engine (``{"1+": "fused:graphs"}``)."""
        if isinstance(self.engine, AutoEngine):
            return self.engine.choice
        return {"1+": str(self.engine_spec)}

    def describe_engine(self) -> str:
        """The engine in one line: ``auto``'s choice with its timings, or the engine string."""
        if isinstance(self.engine, AutoEngine):
            return f"{self.engine_spec}: {self.engine.describe()}"
        return str(self.engine_spec)

    def check_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A raw batch validated against the bundle's input spec, as float32; an
        :class:`~serving.errors.InputError` says what is wrong."""
        return self.engine.check_inputs(x)

    def member_outputs(self, x: torch.Tensor, members: Sequence[int]) -> torch.Tensor:
        """Outputs ``[S, B, ·]`` on the CPU of the chosen members (see :meth:`member_indices`),
        in that order, for a raw batch ``[B, *input_shape]``."""
        return self.engine.outputs(x, members).cpu()

    def warm_up(self) -> None:
        """Run the default members once on an all-zero instance, so that what the engine
        makes per set of members (stacked states, an ONNX graph, CUDA graphs) is made now
        rather than on the first request."""
        self.outputs(torch.zeros(1, *self.manifest.input.shape))

    def outputs(self, x: torch.Tensor, draws: int | None = None) -> torch.Tensor:
        """Member outputs ``[S, B, ·]`` on the CPU for a raw batch ``[B, *input_shape]``."""
        return self.member_outputs(x, self.member_indices(draws))

    def predict(
        self, x: torch.Tensor, *, draws: int | None = None, return_members: bool = False
    ) -> Prediction:
        """Pooled calibrated prediction for a raw batch ``[B, *input_shape]``."""
        outputs = self.outputs(x, draws)
        return calibrated_prediction(self.manifest, outputs, return_members=return_members)


def calibrated_prediction(
    manifest: Manifest, outputs: torch.Tensor, *, return_members: bool = False
) -> Prediction:
    """Member outputs ``[S, B, ·]`` turned into the bundle's calibrated prediction."""
    if manifest.task is Task.REGRESSION:
        return regress(outputs, variance_scale=manifest.temperature, return_members=return_members)
    conformal, abstention = manifest.conformal, manifest.abstention
    return classify(
        outputs,
        temperature=manifest.temperature,
        conformal_method=conformal.method if conformal else None,
        conformal_threshold=conformal.score_threshold if conformal else None,
        abstain_below=abstention.confidence_threshold if abstention else None,
        return_members=return_members,
    )
