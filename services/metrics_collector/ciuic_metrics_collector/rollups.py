"""Pure: what one batch of a series adds to its summary and to its chart rollups.

A rollup bucket covers the steps `[bucket * width, (bucket + 1) * width)` of one series and keeps
what a chart needs to draw it without the raw points: the count, the extremes with their steps,
the first NaN's step, and the first and last points (step and time). NaN never takes part in
min/max (it is counted and located instead); ±inf does, as the extreme it is. Buckets merge
associatively, so a batch's buckets fold into the stored ones and fine buckets into coarse ones.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

__all__ = [
    "ROLLUP_WIDTHS",
    "Bucket",
    "SeriesDelta",
    "bucketize",
    "coarsen",
    "merge",
    "summarise",
]

#: Step widths of the stored rollups, finest first; each is a multiple of the one before.
ROLLUP_WIDTHS: tuple[int, ...] = (50, 1000)


@dataclass(frozen=True, slots=True)
class Bucket:
    """The points of one series in `[bucket * width, (bucket + 1) * width)`."""

    width: int
    bucket: int
    count: int
    nan_count: int
    #: The smallest and largest non-NaN values and where they first occur; None if all NaN.
    min: float | None
    min_step: int | None
    max: float | None
    max_step: int | None
    #: The step of the first NaN, if any.
    nan_step: int | None
    first_step: int
    first_time: datetime
    last_step: int
    last_time: datetime


@dataclass(frozen=True, slots=True)
class SeriesDelta:
    """What one batch adds to a series: its summary part and its buckets at every width."""

    count: int
    nan_count: int
    min: float | None
    max: float | None
    first_step: int
    last_step: int
    #: The value at `last_step` (the later one in the batch when a step repeats).
    last: float
    buckets: dict[int, list[Bucket]]


def _order(steps: Sequence[int]) -> list[int] | None:
    """Indices that sort `steps` (stable), or None when they are sorted already."""
    if list(steps) == sorted(steps):  # linear for sorted input, all in C
        return None
    return sorted(range(len(steps)), key=steps.__getitem__)


def bucketize(
    steps: Sequence[int],
    values: Sequence[float],
    times: Sequence[datetime],
    width: int,
    origin: int = 0,
) -> list[Bucket]:
    """The buckets of `width` steps (`bucket` = (step - origin) // width) that these points
    fall in, in step order."""
    if not steps:
        return []
    order = _order(steps)
    if order is not None:
        steps = [steps[i] for i in order]
        values = [values[i] for i in order]
        times = [times[i] for i in order]
    out: list[Bucket] = []
    n = len(steps)
    i = 0
    while i < n:
        bucket = (steps[i] - origin) // width
        # Points are sorted by step: the bucket ends where the next bucket's first step would be.
        j = bisect.bisect_left(steps, origin + (bucket + 1) * width, i, n)
        chunk = values[i:j]
        finite = [v for v in chunk if v == v]
        nan_count = len(chunk) - len(finite)
        lo: float | None = None
        hi: float | None = None
        lo_step: int | None = None
        hi_step: int | None = None
        if finite:
            lo, hi = min(finite), max(finite)
            lo_step = steps[i + chunk.index(lo)]
            hi_step = steps[i + chunk.index(hi)]
        nan_step = None
        if nan_count:
            nan_step = next(steps[i + k] for k, v in enumerate(chunk) if v != v)
        out.append(
            Bucket(
                width,
                bucket,
                j - i,
                nan_count,
                lo,
                lo_step,
                hi,
                hi_step,
                nan_step,
                steps[i],
                times[i],
                steps[j - 1],
                times[j - 1],
            )
        )
        i = j
    return out


def merge(a: Bucket, b: Bucket, *, width: int | None = None, bucket: int | None = None) -> Bucket:
    """Two buckets as one (the same bucket seen by two batches, or neighbours being coarsened).

    Ties keep the earlier step, so merging in any order gives the same bucket.
    """
    lo, lo_step = _pick(a.min, a.min_step, b.min, b.min_step, smaller=True)
    hi, hi_step = _pick(a.max, a.max_step, b.max, b.max_step, smaller=False)
    nan_steps = [s for s in (a.nan_step, b.nan_step) if s is not None]
    first = a if a.first_step <= b.first_step else b
    last = b if b.last_step >= a.last_step else a
    return Bucket(
        width if width is not None else a.width,
        bucket if bucket is not None else a.bucket,
        a.count + b.count,
        a.nan_count + b.nan_count,
        lo, lo_step, hi, hi_step,
        min(nan_steps) if nan_steps else None,
        first.first_step, first.first_time, last.last_step, last.last_time,
    )  # fmt: skip


def _pick(
    x: float | None, x_step: int | None, y: float | None, y_step: int | None, *, smaller: bool
) -> tuple[float | None, int | None]:
    if x is None or x_step is None:
        return y, y_step
    if y is None or y_step is None:
        return x, x_step
    if x == y:
        return x, min(x_step, y_step)
    better = (x < y) if smaller else (x > y)
    return (x, x_step) if better else (y, y_step)


def coarsen(buckets: Iterable[Bucket], width: int) -> list[Bucket]:
    """Buckets (in step order, of a width dividing `width`) folded into buckets of `width`."""
    out: list[Bucket] = []
    for b in buckets:
        index = b.first_step // width
        if out and out[-1].bucket == index:
            out[-1] = merge(out[-1], b, width=width, bucket=index)
        else:
            out.append(dataclasses.replace(b, width=width, bucket=index))
    return out


def summarise(
    steps: Sequence[int],
    values: Sequence[float],
    times: Sequence[datetime],
    widths: Sequence[int] = ROLLUP_WIDTHS,
) -> SeriesDelta:
    """A batch's points of one series (not empty) as a summary delta and rollup buckets."""
    fine = bucketize(steps, values, times, widths[0])
    buckets = {widths[0]: fine}
    for width in widths[1:]:
        buckets[width] = coarsen(fine, width)
    finite = [b for b in fine if b.min is not None]
    last_step = max(steps)
    # The last occurrence of the last step: a repeated step's later value is the newer one.
    last_index = len(steps) - 1 - list(reversed(steps)).index(last_step)
    return SeriesDelta(
        count=len(steps),
        nan_count=sum(b.nan_count for b in fine),
        min=min((b.min for b in finite if b.min is not None), default=None),
        max=max((b.max for b in finite if b.max is not None), default=None),
        first_step=min(steps),
        last_step=last_step,
        last=values[last_index],
        buckets=buckets,
    )
