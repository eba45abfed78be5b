"""Pure: a curve of any length as at most N points that still show what matters.

Min/max buckets: the step range is cut into equal buckets and each bucket is drawn by its
smallest and its largest value at the steps where they occur, so a one-step spike survives any
zoom level. A bucket that holds a NaN also gets a NaN point (at its first NaN's step): a loss
that diverged is visible however far out the chart is zoomed. ±inf are values like any other.

The input is rollup buckets (stored per batch at fixed widths; see `rollups`) or raw points,
which are bucketed first; output buckets are whole multiples of the input width, so merging the
stored buckets is exact. `plan` decides which of the two to read for a query.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from ciuic_metrics_collector.rollups import ROLLUP_WIDTHS, Bucket, bucketize, merge

__all__ = ["MIN_POINTS", "Plan", "Sample", "downsample", "from_points", "plan"]

#: Fewer points than this cannot show a bucket's min, max and NaN at once.
MIN_POINTS = 3


@dataclass(frozen=True, slots=True)
class Sample:
    """One point to draw. `time` is interpolated inside a bucket when the point came from one."""

    step: int
    value: float
    time: datetime | None


@dataclass(frozen=True, slots=True)
class Plan:
    """What to read for a curve: every raw point (`width` 0) or the rollups of `width` steps."""

    width: int

    @property
    def raw(self) -> bool:
        return self.width == 0


def plan(
    first_step: int,
    last_step: int,
    count: int,
    max_points: int,
    widths: Sequence[int] = ROLLUP_WIDTHS,
) -> Plan:
    """Raw points when there are few enough to read cheaply, else the coarsest rollup width that
    still gives every output bucket at least one whole rollup bucket."""
    span = last_step - first_step + 1
    if count <= max_points:
        return Plan(0)
    per_bucket = span / max(1, max_points // 2)
    usable = [w for w in widths if w <= per_bucket]
    if not usable:
        # Few steps per output bucket: the raw points are at most ~max_points * widths[0] / 2.
        return Plan(0)
    return Plan(max(usable))


def _time_at(b: Bucket, step: int) -> datetime:
    if b.last_step == b.first_step:
        return b.first_time
    share = (step - b.first_step) / (b.last_step - b.first_step)
    return b.first_time + (b.last_time - b.first_time) * share


def _draw(b: Bucket) -> list[Sample]:
    found: dict[int, float] = {}
    if b.min is not None and b.min_step is not None:
        found[b.min_step] = b.min
    if b.max is not None and b.max_step is not None:
        found.setdefault(b.max_step, b.max)
    if b.nan_step is not None:
        found[b.nan_step] = math.nan
    return [Sample(step, value, _time_at(b, step)) for step, value in sorted(found.items())]


def _group(buckets: Sequence[Bucket], per_group: int) -> list[Bucket]:
    """Consecutive runs of `per_group` input buckets (by index, from the first) merged."""
    first = buckets[0].bucket
    width = buckets[0].width * per_group
    out: list[Bucket] = []
    for b in buckets:
        index = (b.bucket - first) // per_group
        if out and out[-1].bucket == index:
            out[-1] = merge(out[-1], b, width=width, bucket=index)
        else:
            out.append(dataclasses.replace(b, width=width, bucket=index))
    return out


def downsample(buckets: Sequence[Bucket], max_points: int) -> list[Sample]:
    """Buckets of one series (in step order, one width) drawn with at most `max_points` points.

    Output buckets are whole runs of input buckets, so no input bucket is split.
    """
    if max_points < MIN_POINTS:
        raise ValueError(f"max_points must be at least {MIN_POINTS}")
    if not buckets:
        return []
    span = buckets[-1].bucket - buckets[0].bucket + 1  # in input buckets
    wanted = max(1, max_points // 2)
    while True:
        drawn = [s for b in _group(buckets, math.ceil(span / wanted)) for s in _draw(b)]
        if len(drawn) <= max_points or wanted == 1:
            return drawn
        # Buckets with a NaN drew three points: use fewer buckets.
        wanted = max(1, min(wanted - 1, wanted * max_points // len(drawn) - 1))


def from_points(
    steps: Sequence[int],
    values: Sequence[float],
    times: Sequence[datetime],
    max_points: int,
) -> tuple[list[Sample], bool]:
    """Raw points (in step order) as they are when few enough, else downsampled; and whether
    they were downsampled."""
    if len(steps) <= max_points:
        return [Sample(s, v, t) for s, v, t in zip(steps, values, times, strict=True)], False
    # Bucketed straight at the output width from the first step: one pass over the points, and
    # at most max_points // 2 buckets.
    span = steps[-1] - steps[0] + 1
    width = max(1, math.ceil(span / max(1, max_points // 2)))
    return downsample(bucketize(steps, values, times, width, steps[0]), max_points), True
