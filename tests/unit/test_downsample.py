"""Curves drawn with few points keep their spikes and NaN; rollups fold batch by batch into what
one pass over every point gives."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from ciuic_metrics_collector.downsample import downsample, from_points, plan
from ciuic_metrics_collector.rollups import bucketize, coarsen, merge, summarise

T0 = datetime(2026, 12, 5, tzinfo=UTC)


def times_for(steps: list[int]) -> list[datetime]:
    return [T0 + timedelta(seconds=s) for s in steps]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_a_short_curve_comes_back_whole_with_its_times() -> None:
    steps = list(range(10))
    values = [float(s) for s in steps]
    samples, down = from_points(steps, values, times_for(steps), 100)
    assert not down
    assert [(s.step, s.value, s.time) for s in samples] == list(
        zip(steps, values, times_for(steps), strict=True)
    )


def test_a_one_step_spike_survives_a_thousandfold_reduction() -> None:
    steps = list(range(200_000))
    values = [0.5] * len(steps)
    values[123_457] = 1e6
    values[7] = -3.0
    samples, down = from_points(steps, values, times_for(steps), 200)
    assert down
    assert len(samples) <= 200
    assert (123_457, 1e6) in [(s.step, s.value) for s in samples]
    assert (7, -3.0) in [(s.step, s.value) for s in samples]


def test_a_nan_shows_as_a_nan_point_at_its_step() -> None:
    steps = list(range(100_000))
    values = [1.0 / (s + 1) for s in steps]
    values[64_000] = math.nan
    values[90_000] = math.inf
    samples, _ = from_points(steps, values, times_for(steps), 100)
    assert [s.step for s in samples if math.isnan(s.value)] == [64_000]
    assert (90_000, math.inf) in [(s.step, s.value) for s in samples]


def test_rollup_path_draws_the_same_extremes_as_raw_points() -> None:
    steps = list(range(0, 1_000_000, 1))
    values = [math.sin(s / 5000) for s in steps]
    values[333_333] = 42.0
    values[500_001] = math.nan
    times = times_for(steps)
    fine = bucketize(steps, values, times, 1000)
    samples = downsample(fine, 1000)
    assert len(samples) <= 1000
    drawn = {(s.step, s.value) for s in samples if not math.isnan(s.value)}
    assert (333_333, 42.0) in drawn
    assert [s.step for s in samples if math.isnan(s.value)] == [500_001]
    # Interpolated times stay inside the curve's time range and follow the steps.
    assert all(times[0] <= s.time <= times[-1] for s in samples if s.time is not None)


def test_plan_reads_raw_points_when_few_and_the_coarsest_rollup_that_fits_otherwise() -> None:
    assert plan(0, 999, 1000, 1000).raw
    assert plan(0, 999_999, 1_000_000, 1000).width == 1000
    assert plan(0, 99_999, 100_000, 1000).width == 50
    assert plan(0, 19_999, 20_000, 1000).raw  # 40 steps per output bucket: finer than rollups


points = st.lists(
    st.tuples(
        st.integers(min_value=-(10**6), max_value=10**6),
        st.floats(allow_nan=True, allow_infinity=True, width=64),
    ),
    min_size=1,
    max_size=400,
    unique_by=lambda p: p[0],
).map(sorted)


@given(points, st.integers(min_value=3, max_value=60))
@settings(max_examples=300, deadline=None)
def test_downsampled_curves_keep_extremes_and_nan_within_the_budget(
    pts: list[tuple[int, float]], max_points: int
) -> None:
    steps = [s for s, _ in pts]
    values = [v for _, v in pts]
    samples, _ = from_points(steps, values, times_for(steps), max_points)
    assert len(samples) <= max_points
    out_steps = [s.step for s in samples]
    assert out_steps == sorted(set(out_steps))
    original = dict(pts)
    for s in samples:  # every drawn point is a stored point
        assert same(original[s.step], s.value)
    finite = [v for v in values if not math.isnan(v)]
    drawn = [s.value for s in samples]
    if finite:
        assert min(finite) in drawn
        assert max(finite) in drawn
    if len(finite) < len(values):
        assert any(math.isnan(v) for v in drawn)


@given(points, st.integers(min_value=1, max_value=5), st.sampled_from([1, 7, 50]))
@settings(max_examples=200, deadline=None)
def test_buckets_merged_batch_by_batch_equal_one_pass(
    pts: list[tuple[int, float]], cuts: int, width: int
) -> None:
    steps = [s for s, _ in pts]
    values = [v for _, v in pts]
    times = times_for(steps)
    whole = bucketize(steps, values, times, width)
    size = max(1, len(pts) // cuts)
    merged: dict[int, object] = {}
    for i in range(0, len(pts), size):
        for b in bucketize(steps[i : i + size], values[i : i + size], times[i : i + size], width):
            prev = merged.get(b.bucket)
            merged[b.bucket] = b if prev is None else merge(prev, b)  # type: ignore[arg-type]
    assert [merged[b.bucket] for b in whole] == whole
    assert coarsen(whole, width * 10) == bucketize(steps, values, times, width * 10)


def test_a_batch_summary_ignores_nan_in_min_and_max_and_counts_it() -> None:
    steps = [3, 1, 2, 4]
    values = [2.0, math.nan, -math.inf, 5.0]
    delta = summarise(steps, values, times_for(steps), (50, 1000))
    assert (delta.count, delta.nan_count) == (4, 1)
    assert (delta.min, delta.max) == (-math.inf, 5.0)
    assert (delta.first_step, delta.last_step, delta.last) == (1, 4, 5.0)
    (bucket,) = delta.buckets[50]
    assert (bucket.min_step, bucket.max_step, bucket.nan_step) == (2, 4, 1)
    assert delta.buckets[1000][0].count == 4
