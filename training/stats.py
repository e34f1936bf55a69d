"""Statistics over training seeds: Student-t intervals of means and of paired differences,
and the verdict an interval gives on a claim that one method scores lower than another.

Seeds are few (typically 5), so the interval uses Student's t with ``n - 1`` degrees of
freedom rather than a normal approximation. Differences are paired by seed: both methods of a
pair share the seed, the data split and the noise, so seed-to-seed variation cancels.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from scipy.stats import t

LEVEL = 0.95

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
INCONCLUSIVE = "inconclusive"
ONE_SEED = "inconclusive (1 seed)"
VERDICTS = (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE, ONE_SEED)


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values and its two-sided Student-t interval (none for one value)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else self.high - self.mean

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """The mean of ``values`` with its ``level`` Student-t confidence interval."""
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Interval(mean, None, None, 1)
    half = float(t.ppf((1 + level) / 2, len(values) - 1)) * statistics.stdev(values)
    half /= math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
    """The interval of the mean of ``a[i] - b[i]`` (``a`` and ``b`` paired by seed)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} values paired with {len(b)}")
    return t_interval([x - y for x, y in zip(a, b, strict=True)], level)


def verdict(difference: Interval) -> str:
    """Whether ``difference`` (method minus baseline) supports "the method scores lower"."""
    if difference.low is None or difference.high is None:
        return ONE_SEED
    if difference.high < 0:
        return HOLDS
    if difference.low > 0:
        return DOES_NOT_HOLD
    return INCONCLUSIVE
