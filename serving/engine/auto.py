"""``auto``: time the exact engines on the bundle itself and answer each batch size with the
fastest.

Which engine is fastest depends on the model, the number of members, the batch and the
machine (docs/performance.md: ONNX Runtime leads for convolutions on one CPU, ``fused`` loses
to the loop at one row on another, CUDA graphs win on a GPU), so it is measured where the
bundle is served instead of guessed.

The candidates are ``reference`` (always: nothing chosen is slower than the loop at a measured
size), ``fused``, ``shortcut`` where it mixes the default members' first layer, and ``onnx``
where ONNX Runtime is installed; on CUDA ``fused`` and ``shortcut`` replay CUDA graphs. With a
reduced precision (``auto:bf16``) ``fused`` and ``shortcut`` are also timed in it.

Each candidate runs every stored member on random rows of the bundle's input shape, at each
of :data:`ROWS` in turn: one untimed call, then the median of ``repeats`` timed calls. A
candidate's first call ever, one more, prepares it (stacks, an ONNX export, graph capture) and
is not charged to ``budget_s``; every other call is. The smallest size is timed in full
whatever it costs, so that a bundle whose few rows already outlast the budget (a large model
on a slow CPU) still gets the fastest engine rather than the reference by default; at a
larger size no call starts once the budget is spent. At a size, candidates run fastest first
(by the previous size's medians), and one whose calls there all took over ``slack`` times
the best median so far is stopped as slower. A size counts only if every candidate was timed
or stopped at it. A candidate that raises (an export it cannot do, memory at a size) is left
out from there on; the reference raising at the first size fails the engine, as the bundle's
members do not run.

The rule: a batch of n rows runs on the winner of the largest counted size ≤ n (the smallest
counted size's winner below it); with no counted size (a zero budget), the reference answers
every batch.
Only the winners are kept; the others, with what they prepared, are dropped. All of them share
the members' tensors, materialised once on the device; each kept ``fused`` or ``shortcut``
engine also holds its stacked copies of the members it ran, and ``onnx`` its graph's.
"""

from __future__ import annotations

import bisect
import gc
import importlib.util
import itertools
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from serving.engine import EngineSpec, create_engine
from serving.engine.base import Engine, MemberState, Origin
from serving.engine.reference import ReferenceEngine
from serving.engine.shortcut import ShortcutEngine
from serving.manifest import InputSpec

ROWS = (1, 8, 64)
"""The batch sizes timed."""
Timings = dict[int, dict[str, float | None]]
"""Per counted size, each candidate's median seconds (``None``: stopped as slower)."""


def onnx_available() -> bool:
    """Whether ONNX Runtime can be imported (it is not imported here)."""
    return importlib.util.find_spec("onnxruntime") is not None


def time_call(engine: Engine, x: torch.Tensor) -> float:
    """Seconds of one call, outputs brought to the CPU as the predictor does (which also
    waits for a GPU)."""
    start = time.perf_counter()
    engine.outputs(x).cpu()
    return time.perf_counter() - start


def candidate_specs(device: torch.device, precision: str) -> list[str]:
    """The engine strings timed on ``device``, before what applies to the bundle is known."""
    cuda = device.type == "cuda"
    precisions = ["fp32"] + ([precision] if precision != "fp32" else [])
    torch_engines = [
        str(EngineSpec(name, p, cuda_graphs=cuda))  # type: ignore[arg-type]
        for p in precisions
        for name in ("fused", "shortcut")
    ]
    return ["reference", *torch_engines, "onnx"]


class _OutOfBudget(Exception):
    """The budget ended before a candidate was timed or stopped at a size."""


@dataclass
class _Budget:
    """Seconds of calls left to charge, and the calls charged so far."""

    seconds: float
    spent: float = 0.0
    binding: bool = True
    """Whether a call may not start once the seconds are spent."""

    def call(self, engine: Engine, x: torch.Tensor, *, charged: bool) -> float:
        if self.binding and self.spent >= self.seconds:
            raise _OutOfBudget
        seconds = time_call(engine, x)
        self.spent += seconds if charged else 0.0
        return seconds


def _median_or_slower(
    engine: Engine,
    x: torch.Tensor,
    budget: _Budget,
    *,
    prepared: bool,
    best: float,
    repeats: int,
    slack: float,
) -> float | None:
    """The median of ``repeats`` timed calls after an untimed one, or ``None`` once every
    call so far took over ``slack`` × ``best``. An engine not yet ``prepared`` first makes
    one more call, neither charged nor a speed, which prepares it."""
    if not prepared:
        budget.call(engine, x, charged=False)
    samples, times = [budget.call(engine, x, charged=True)], []
    while len(times) < repeats and min(samples) <= slack * best:
        times.append(budget.call(engine, x, charged=True))
        samples.append(times[-1])
    return None if min(samples) > slack * best else statistics.median(times)


def measure(
    engines: dict[str, Engine],
    x: torch.Tensor,
    *,
    budget_s: float,
    repeats: int,
    slack: float,
    rows: Sequence[int] = ROWS,
) -> tuple[Timings, float, dict[str, str]]:
    """Time ``engines`` on the first rows of ``x`` at each size of ``rows`` (see the module).
    Returns the counted sizes' timings, the seconds charged, and why candidates failed: one
    that raises is not timed from that size on. The first engine is the reference: its failure
    at the first size is the bundle's and propagates; at a later one it ends the timing."""
    budget, prepared, order = _Budget(budget_s), set[str](), list(engines)
    reference = order[0]
    timings: Timings = {}
    failed: dict[str, str] = {}
    for k, n in enumerate(sorted(rows)):
        budget.binding = k > 0 or budget_s <= 0  # the smallest size in full, unless told 0 s
        row: dict[str, float | None] = {}
        try:
            for name in list(order):
                best = min((t for t in row.values() if t is not None), default=math.inf)
                first = name not in prepared
                prepared.add(name)
                try:
                    row[name] = _median_or_slower(
                        engines[name],
                        x[:n],
                        budget,
                        prepared=not first,
                        best=best,
                        repeats=repeats,
                        slack=slack,
                    )
                except _OutOfBudget:
                    raise
                except Exception as err:  # out of memory at this size, a failed export, ...
                    if name == reference and not timings:
                        raise
                    failed[name] = f"{type(err).__name__} at {n} rows: {err}"
                    if name == reference:
                        break
                    order.remove(name)
        except _OutOfBudget:
            break
        if len(row) < len(order):
            break
        timings[n] = row
        order.sort(key=lambda name: math.inf if row[name] is None else row[name])
    return timings, budget.spent, failed


def range_labels(starts: Sequence[int]) -> list[str]:
    """``"1-7"``, ``"8-63"``, ``"64+"``: the rows each start's winner answers."""
    inner = [f"{a}-{b - 1}" if b - 1 > a else f"{a}" for a, b in itertools.pairwise(starts)]
    return [*inner, f"{starts[-1]}+"]


class AutoEngine:
    """The fastest exact engine per range of batch sizes, chosen by timing at construction
    (see the module). ``precision``: also time ``fused`` and ``shortcut`` in ``bf16`` or
    ``fp16`` (their answers are then within that precision's tolerance, not fp32's).
    ``options`` go to every candidate (``device``, ``chunk_size``, ``vertices``, ``origins``).
    """

    def __init__(
        self,
        model: nn.Module,
        members: Sequence[MemberState],
        input_spec: InputSpec,
        *,
        precision: Literal["fp32", "bf16", "fp16"] = "fp32",
        budget_s: float = 2.0,
        repeats: int = 3,
        slack: float = 1.5,
        rows: Sequence[int] = ROWS,
        **options: Any,
    ) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        reference = ReferenceEngine(model, members, input_spec, **options)
        self.device = reference.device
        self.skipped: dict[str, str] = {}
        """Candidates left out, with why: unavailable, not applying, or failing (from the
        size named on)."""
        engines: dict[str, Engine] = {"reference": reference}
        for spec in candidate_specs(self.device, precision)[1:]:
            engine = self._candidate(spec, reference, input_spec, options)
            if engine is not None:
                engines[spec] = engine
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(max(rows), *input_spec.shape, generator=generator)
        self.timings, self.spent_s, failed = measure(
            engines, x, budget_s=budget_s, repeats=repeats, slack=slack, rows=rows
        )
        self.skipped |= failed
        starts = sorted(self.timings) or [1]
        starts[0] = 1
        winners = [
            min(row, key=lambda name: math.inf if row[name] is None else row[name])
            for row in self.timings.values()
        ] or ["reference"]
        self._starts = starts
        self.choice = dict(zip(range_labels(starts), winners, strict=True))
        """The engine string answering each range of batch rows: ``{"1-7": "fused", ...}``."""
        self._engines = {name: engines[name] for name in dict.fromkeys(winners)}
        self._by_range = [self._engines[name] for name in winners]
        # The others go now: a fused engine refers to itself (its bound ``run``), a cycle that
        # would keep its stacks and graphs until some later collection.
        del engines, reference
        gc.collect()

    def _candidate(
        self,
        spec: str,
        reference: ReferenceEngine,
        input_spec: InputSpec,
        options: dict[str, Any],
    ) -> Engine | None:
        """The candidate ``spec`` over the reference's materialised members, or ``None`` (and
        why, in :attr:`skipped`) where it is unavailable, does not apply or fails to build."""
        if spec == "onnx" and not onnx_available():
            self.skipped[spec] = "onnxruntime is not installed"
            return None
        try:
            engine = create_engine(spec, reference.model, reference.members, input_spec, **options)
        except Exception as err:  # an unbuildable candidate leaves the others to choose from
            self.skipped[spec] = f"{type(err).__name__}: {err}"
            return None
        if isinstance(engine, ShortcutEngine) and not engine.mixes(range(len(engine))):
            self.skipped[spec] = "the shortcut does not apply (it would run as fused)"
            return None
        return engine

    def __len__(self) -> int:
        return len(self._by_range[0])

    def add(self, member: MemberState, origin: Origin | None = None) -> int:
        """Hold one more member in every kept engine, materialised once on the device."""
        member = {k: v.to(self.device) for k, v in member.items()}
        indices = {engine.add(member, origin) for engine in self._engines.values()}
        (index,) = indices
        return index

    def check_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return self._by_range[0].check_inputs(x)

    def engine_for(self, rows: int) -> Engine:
        """The kept engine that answers a batch of ``rows`` rows."""
        return self._by_range[max(0, bisect.bisect_right(self._starts, rows) - 1)]

    def outputs(self, x: torch.Tensor, members: Sequence[int] | None = None) -> torch.Tensor:
        return self.engine_for(len(x)).outputs(x, members)

    def describe(self) -> str:
        """The choice in one line: per range the winner's median ms and the others'."""
        parts = []
        for label, (n, row) in zip(self.choice, self.timings.items(), strict=False):
            winner = self.choice[label]
            others = ", ".join(
                f"{name} {'slower' if t is None else f'{t * 1e3:.3g}'}"
                for name, t in row.items()
                if name != winner
            )
            parts.append(f"rows {label}: {winner} {row[winner] * 1e3:.3g} ms at {n} ({others})")
        if not self.timings:
            parts.append("rows 1+: reference (the budget ran out before a size was timed)")
        parts.append(f"timed in {self.spent_s:.2f} s")
        parts += [f"left out: {name} ({why})" for name, why in self.skipped.items()]
        return "; ".join(parts)
