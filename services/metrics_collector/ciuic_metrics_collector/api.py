"""The gRPC API of the metrics collector (`ciuic.v1.MetricsService`): curves, ranges, summaries,
live streams and comparisons.

Thin: validate the request, read the store, draw curves with `downsample`, map to messages.
Domain errors (InvalidArgument, NotFound) become status codes in the shared interceptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ciuic_common.db import Connection, Database
from ciuic_common.errors import InvalidArgument, NotFound, Unavailable
from ciuic_common.proto import metrics_collector_pb2 as pb
from ciuic_common.proto import metrics_collector_pb2_grpc
from ciuic_common.rpc import timestamp
from ciuic_metrics_collector import store
from ciuic_metrics_collector.downsample import MIN_POINTS, Sample, downsample, from_points, plan
from ciuic_metrics_collector.history import History, resolve_run_id
from ciuic_metrics_collector.rollups import bucketize
from ciuic_metrics_collector.store import SeriesRow
from ciuic_metrics_collector.streams import FROM_NOW, Feed

__all__ = ["FROM_NOW", "Limits", "MetricsApi"]

MAX_STEP = 2**63 - 1
MIN_STEP = -(2**63)


@dataclass(frozen=True)
class Limits:
    """Defaults and caps of the queries."""

    curve_points: int = 1_000
    max_curve_points: int = 20_000
    range_points: int = 10_000
    max_range_points: int = 100_000
    #: Points one stream update carries at most (the rest follow at once).
    stream_points: int = 10_000
    #: A stream looks for new points at least this often, even without a notification.
    stream_poll_s: float = 5.0


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _series_message(s: SeriesRow, samples: Sequence[Sample], total: int, down: bool) -> pb.Series:
    return pb.Series(
        run_id=s.run_id,
        job_id=s.job_id,
        key=s.key,
        source=s.source,
        points=[pb.Point(step=p.step, value=p.value, time=timestamp(p.time)) for p in samples],
        total_points=total,
        downsampled=down,
    )


def _job_filter(run_id: str, job_ids: Sequence[str]) -> list[str]:
    """Job ids as given, and as job names within the run (`trial-0` is `<run_id>-trial-0`)."""
    out: list[str] = []
    for j in job_ids:
        out.append(j)
        if not j.startswith(f"{run_id}-"):
            out.append(f"{run_id}-{j}")
    return out


async def curve(
    conn: Connection, s: SeriesRow, lo: int, hi: int, max_points: int
) -> tuple[list[Sample], int, bool]:
    """A series between steps lo and hi drawn with at most `max_points` points: the samples,
    how many points they stand for, and whether they were downsampled."""
    if s.first_step is None or s.last_step is None:
        return [], 0, False
    lo, hi = max(lo, s.first_step), min(hi, s.last_step)
    if lo > hi:
        return [], 0, False
    how = plan(lo, hi, s.count, max_points)
    if not how.raw:
        w = how.width
        first_full, last_full = -(-lo // w), (hi + 1) // w - 1  # buckets wholly inside
        if first_full <= last_full:
            middle = await store.rollups(conn, s.id, w, first_full, last_full)
            left = await store.points(conn, s.id, lo, first_full * w - 1, w)
            right = await store.points(conn, s.id, (last_full + 1) * w, hi, w)
            buckets = [*bucketize(*left, w), *middle, *bucketize(*right, w)]
            total = sum(b.count for b in buckets)
            return downsample(buckets, max_points), total, True
    steps, values, times = await store.points(conn, s.id, lo, hi, MAX_RAW_READ)
    samples, down = from_points(steps, values, times, max_points)
    return samples, len(steps), down


#: The most raw points one curve reads (a window too narrow for rollups never needs more).
MAX_RAW_READ = 2_000_000


class MetricsApi(metrics_collector_pb2_grpc.MetricsServiceServicer):
    """Serves curves, ranges, summaries, streams and comparisons from any replica."""

    def __init__(
        self, db: Database, feed: Feed, history: History, limits: Limits | None = None
    ) -> None:
        self.db = db
        self.feed = feed
        self.history = history
        self.limits = limits or Limits()
        # Set by close(): open streams end, new ones are refused.
        self._closing = asyncio.Event()
        # The wake flags of the open streams, so close() reaches them at once.
        self._open: set[asyncio.Event] = set()

    async def GetCurves(self, request: pb.GetCurvesRequest, context: Any) -> pb.GetCurvesResponse:
        limits = self.limits
        wanted = request.max_points or limits.curve_points
        if wanted < 0:
            raise InvalidArgument("max_points must not be negative")
        max_points = min(max(wanted, MIN_POINTS), limits.max_curve_points)
        lo, hi = request.from_step, request.to_step or MAX_STEP
        if lo > hi:
            raise InvalidArgument(f"from_step {lo} is after to_step {hi}")
        async with self.db.connection() as conn:
            run_id = await resolve_run_id(conn, request.run_id)
            series = await store.series_of(
                conn, [run_id], list(request.keys), _job_filter(run_id, request.job_ids)
            )
            out = []
            for s in series:
                samples, total, down = await curve(conn, s, lo, hi, max_points)
                out.append(_series_message(s, samples, total, down))
        return pb.GetCurvesResponse(series=out)

    async def GetRange(self, request: pb.GetRangeRequest, context: Any) -> pb.Series:
        if not request.job_id or not request.key:
            raise InvalidArgument("job_id and key are required")
        if request.limit < 0:
            raise InvalidArgument("limit must not be negative")
        limit = min(request.limit or self.limits.range_points, self.limits.max_range_points)
        hi = request.to_step or MAX_STEP
        async with self.db.connection() as conn:
            run_id = await resolve_run_id(conn, request.run_id)
            found = await store.series_of(
                conn, [run_id], [request.key], _job_filter(run_id, [request.job_id])
            )
            if not found:
                raise NotFound(
                    f"run {run_id} has no metric {request.key!r} logged by job {request.job_id!r}"
                )
            s = found[0]
            steps, values, times = await store.points(conn, s.id, request.from_step, hi, limit)
        samples = [Sample(a, b, c) for a, b, c in zip(steps, values, times, strict=True)]
        return _series_message(s, samples, s.count, False)

    async def GetSummaries(
        self, request: pb.GetSummariesRequest, context: Any
    ) -> pb.GetSummariesResponse:
        if not request.run_ids:
            raise InvalidArgument("run_ids names no run")
        async with self.db.connection() as conn:
            run_ids = [await resolve_run_id(conn, r) for r in request.run_ids]
            series = await store.series_of(conn, run_ids, list(request.keys))
        return pb.GetSummariesResponse(
            summaries=[
                pb.Summary(
                    run_id=s.run_id,
                    job_id=s.job_id,
                    key=s.key,
                    source=s.source,
                    last=_nan(s.last),
                    min=_nan(s.min),
                    max=_nan(s.max),
                    count=s.count,
                    nan_count=s.nan_count,
                    first_step=s.first_step or 0,
                    last_step=s.last_step or 0,
                    updated_at=timestamp(s.updated_at),
                )
                for s in series
            ]
        )

    async def StreamMetrics(
        self, request: pb.StreamMetricsRequest, context: Any
    ) -> AsyncIterator[pb.MetricsUpdate]:
        """A run's points as they are committed, per series, until the client goes away or the
        service drains.

        Where each series starts, by `after_step` (the proto cannot say it, so it is said here):
        - `after_step >= -1`: after that step, for the series there now and those that appear
          later alike; stored points are replayed first (-1: every point, step 0 included).
        - `after_step < -1` (`FROM_NOW`): from now. A series present when the stream opens
          starts after its last stored step; one that appears later (a new trial) starts at its
          first point, whatever its steps.
        The initial metadata goes out once those starting points are fixed, so a client that
        reads the stored curves after it (`await call.initial_metadata()`) misses no point.
        When the service drains (`close()`), the stream ends with UNAVAILABLE: reconnect.
        """
        self._refuse_if_closed()
        async with self.db.connection() as conn:
            run_id = await resolve_run_id(conn, request.run_id)
        keys = list(request.keys)
        from_now = request.after_step < -1
        # Where a series not seen at the start begins: at its first point when from now.
        start = MIN_STEP if from_now else request.after_step
        cursors: dict[int, int] = {}
        limits = self.limits
        with self.feed.watch(run_id) as woken:  # before the snapshot: no commit goes unheard
            self._open.add(woken)
            try:
                if from_now:
                    async with self.db.connection() as conn:
                        cursors = {
                            s.id: s.last_step
                            for s in await store.series_of(conn, [run_id], keys)
                            if s.last_step is not None
                        }
                await context.send_initial_metadata(())
                while not self._closing.is_set():
                    woken.clear()  # before reading: a commit during the read wakes us again
                    async with self.db.connection() as conn:
                        series = {s.id: s for s in await store.series_of(conn, [run_id], keys)}
                        for sid in series:
                            cursors.setdefault(sid, start)
                        behind = {
                            sid: cursors[sid]
                            for sid, s in series.items()
                            if s.last_step is not None and s.last_step > cursors[sid]
                        }
                        rows = []
                        if behind:
                            each = max(100, limits.stream_points // len(behind))
                            rows = await store.points_after(conn, behind, each)
                    if not rows:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(woken.wait(), limits.stream_poll_s)
                        continue
                    grouped: dict[int, list[Sample]] = {}
                    for r in rows:
                        sample = Sample(r["step"], r["value"], r["time"])
                        grouped.setdefault(r["series"], []).append(sample)
                    update = []
                    for sid, samples in grouped.items():
                        cursors[sid] = samples[-1].step
                        s = series[sid]
                        update.append(_series_message(s, samples, s.count, False))
                    yield pb.MetricsUpdate(series=update)
            finally:
                self._open.discard(woken)
        self._refuse_if_closed()

    async def close(self) -> None:
        """End every open stream now (with UNAVAILABLE, so clients reconnect, to another replica
        or to this one restarted) and refuse new ones: the service is draining, and a stream
        never ends by itself, so without this the gRPC server's stop waits out its grace."""
        self._closing.set()
        for woken in self._open:
            woken.set()

    def _refuse_if_closed(self) -> None:
        if self._closing.is_set():
            raise Unavailable("the metrics collector is shutting down; reconnect to go on")

    async def CompareRun(self, request: pb.CompareRunRequest, context: Any) -> pb.Comparison:
        result = await self.history.compare_run(
            request.run_id, request.baseline_run_id, list(request.keys)
        )
        return pb.Comparison(
            run_id=result.run_id,
            baseline_run_id=result.baseline_run_id or "",
            reason=result.reason,
            metrics=[
                pb.MetricComparison(
                    key=m.key,
                    value=_nan(m.value),
                    baseline=_nan(m.baseline),
                    delta=m.delta,
                    delta_pct=m.delta_pct,
                    better=m.better,
                    verdict=m.verdict,
                )
                for m in result.metrics
            ],
        )
