"""Seeds and paired differences for the quality experiment: what a comparison over seeds says.

Every arm is trained once per seed; the seed fixes the data order (the student starts from the
teacher's layers, the same for every seed), so two arms with the same seed saw the same
documents in the same order. A comparison of arm A against arm B is therefore made per seed,
``d_s = m(A, s) - m(B, s)`` (or ``m(A, s) / m(B, s) - 1`` for a relative one), and reported as
the mean of ``d_s`` with a two-sided 95 % Student-t interval over the seeds:
``mean +- t(0.975, n - 1) * sd / sqrt(n)``. With 3 seeds ``t = 4.30``: the intervals are wide
on purpose; a difference whose interval excludes 0 is one the seeds agree on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: Two-sided 95 % quantiles of Student's t, by degrees of freedom 1 to 30 (scipy is not a
#: dependency).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
        17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064,
        25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}  # fmt: skip


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (1.96 beyond 30)."""
    if df < 1:
        return math.nan
    return 1.96 if df > 30 else T975[df]


@dataclass(frozen=True)
class Interval:
    """A mean over seeds and its 95 % t-interval (``low == high == mean`` for one seed is not
    claimed: both are NaN)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def format(self, percent: bool = False, digits: int = 4) -> str:
        """``+0.0123 [-0.0040, +0.0286]`` (or in percent)."""
        if percent:
            return f"{self.mean:+.1%} [{self.low:+.1%}, {self.high:+.1%}]"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def mean_interval(values: Iterable[float]) -> Interval:
    """Mean and 95 % t-interval of ``values`` (NaN values are left out)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired(a: Mapping[int, float], b: Mapping[int, float], *, relative: bool = False) -> Interval:
    """The paired difference of two arms over the seeds both have (``a - b``, or ``a / b - 1``
    when ``relative``)."""
    seeds = sorted(set(a) & set(b))
    if relative:
        return mean_interval(a[s] / b[s] - 1 for s in seeds if b[s])
    return mean_interval(a[s] - b[s] for s in seeds)


def per_seed(results: Mapping[str, Mapping[int, Mapping]], arm: str, metric: str) -> dict:
    """``{seed: value}`` of one arm's final held-out ``metric`` (seeds that failed are absent)."""
    return {
        seed: run["final"][metric]
        for seed, run in results.get(arm, {}).items()
        if "final" in run and metric in run["final"]
    }


def curve(
    results: Mapping[str, Mapping[int, Mapping]], arm: str, metric: str
) -> tuple[list[int], list[Interval]]:
    """Steps and, per step, the mean over seeds of the held-out ``metric`` at that checkpoint."""
    by_step: dict[int, list[float]] = {}
    for run in results.get(arm, {}).values():
        for point in run.get("curve", []):
            if metric in point:
                by_step.setdefault(int(point["step"]), []).append(point[metric])
    steps = sorted(by_step)
    return steps, [mean_interval(by_step[s]) for s in steps]
