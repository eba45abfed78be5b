"""Per-metric running summaries of what a job logged, for `JobFinished.metrics`.

For every metric key: the last value, min, max, how many points, and the mean of the last k points
(`avg_last_k`; the scheduler reads it for the objective metric to pick the best trial).

NaN is a value a diverging run really logs, so it counts in `count`, becomes `last` when it is the
last point, and poisons `avg_last_k` when it is among the last k points (a run that ends in NaN
must not look good); `min` and `max` ignore it and are NaN only when every point was NaN.
Infinities are ordinary values everywhere. Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["DEFAULT_LAST_K", "MetricSummary", "Summaries"]

#: How many of the last points `avg_last_k` averages unless told otherwise.
DEFAULT_LAST_K = 10

_NAN = math.nan


class MetricSummary:
    """The running summary of one metric key."""

    __slots__ = ("_recent", "count", "last", "max", "min")

    def __init__(self, k: int = DEFAULT_LAST_K) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.last = _NAN
        self.min = _NAN
        self.max = _NAN
        self.count = 0
        self._recent: deque[float] = deque(maxlen=k)

    @property
    def k(self) -> int:
        """How many of the last points `avg_last_k` averages."""
        return self._recent.maxlen or 0

    def add(self, value: float) -> None:
        """Fold one point in."""
        self.add_many((value,))

    def add_many(self, values: Sequence[float]) -> None:
        """Fold points in, in the order they were logged (faster than `add` one by one)."""
        if not values:
            return
        self.count += len(values)
        self.last = values[-1]
        self._recent.extend(values)
        numbers = [v for v in values if v == v]  # NaN != NaN: min/max ignore it
        if numbers:
            low, high = min(numbers), max(numbers)
            # A fresh summary holds NaN, and every comparison with NaN is false.
            if not low >= self.min:
                self.min = low
            if not high <= self.max:
                self.max = high

    @property
    def avg_last_k(self) -> float:
        """Mean of the last k points (NaN if one of them is NaN, or before any point)."""
        recent = self._recent
        return sum(recent) / len(recent) if recent else _NAN

    def as_dict(self) -> dict[str, float]:
        """The summary as `JobFinished.metrics` carries it for one key."""
        return {
            "last": self.last,
            "min": self.min,
            "max": self.max,
            "count": float(self.count),
            "avg_last_k": self.avg_last_k,
        }


class Summaries:
    """Running summaries of every metric key of a job."""

    def __init__(self, k: int = DEFAULT_LAST_K) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = k
        self._by_key: dict[str, MetricSummary] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __getitem__(self, key: str) -> MetricSummary:
        return self._by_key[key]

    def add(self, key: str, value: float) -> None:
        """Fold one point of `key` in."""
        self._summary(key).add(value)

    def add_points(self, points: Iterable[tuple[str, float]]) -> None:
        """Fold `(key, value)` points in, in logged order."""
        by_key: dict[str, list[float]] = {}
        for key, value in points:
            values = by_key.get(key)
            if values is None:
                by_key[key] = [value]
            else:
                values.append(value)
        self.add_grouped(by_key)

    def add_grouped(self, values_by_key: Mapping[str, Sequence[float]]) -> None:
        """Fold values already grouped by key (each sequence in logged order) in."""
        for key, values in values_by_key.items():
            self._summary(key).add_many(values)

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Every key's summary, as `JobFinished.metrics` expects."""
        return {key: summary.as_dict() for key, summary in self._by_key.items()}

    def _summary(self, key: str) -> MetricSummary:
        summary = self._by_key.get(key)
        if summary is None:
            summary = self._by_key[key] = MetricSummary(self.k)
        return summary
