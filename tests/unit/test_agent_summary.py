"""Per-metric summaries for JobFinished.metrics, checked against a naive reference."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciuic_common.events import JobFinished
from ciuic_gpu_agent.summary import MetricSummary, Summaries

values = st.floats(allow_nan=True, allow_infinity=True)
points = st.lists(st.tuples(st.sampled_from(["loss", "acc", "lr"]), values), max_size=60)


def reference(logged: list[float], k: int) -> dict[str, float]:
    """The summary computed the obvious way, from the whole list."""
    numbers = [v for v in logged if not math.isnan(v)]
    recent = logged[-k:]
    return {
        "last": logged[-1],
        "min": min(numbers) if numbers else math.nan,
        "max": max(numbers) if numbers else math.nan,
        "count": float(len(logged)),
        "avg_last_k": sum(recent) / len(recent),
    }


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[f]) and math.isnan(b[f])) or a[f] == b[f] for f in a
    )


@given(points, st.integers(1, 12))
def test_summaries_match_the_naive_reference_whatever_is_logged(
    logged: list[tuple[str, float]], k: int
) -> None:
    summaries = Summaries(k)
    summaries.add_points(logged)
    expected = {key: reference([v for name, v in logged if name == key], k) for key, _ in logged}
    got = summaries.as_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert same(got[key], expected[key]), key


@given(st.lists(values, min_size=1, max_size=40), st.integers(0, 40), st.integers(1, 8))
def test_folding_in_batches_or_one_by_one_gives_the_same_summary(
    logged: list[float], cut: int, k: int
) -> None:
    one_by_one, batched = MetricSummary(k), MetricSummary(k)
    for v in logged:
        one_by_one.add(v)
    batched.add_many(logged[:cut])
    batched.add_many(logged[cut:])
    assert same(one_by_one.as_dict(), batched.as_dict())


def test_nan_is_counted_but_ignored_by_min_and_max() -> None:
    summary = MetricSummary(k=2)
    for v in (3.0, math.nan, 1.0):
        summary.add(v)
    got = summary.as_dict()
    assert (got["min"], got["max"], got["count"], got["last"]) == (1.0, 3.0, 3.0, 1.0)
    assert math.isnan(got["avg_last_k"])  # the NaN is among the last two points


def test_a_metric_that_was_only_ever_nan_has_nan_min_and_max() -> None:
    summary = MetricSummary()
    summary.add_many([math.nan, math.nan])
    got = summary.as_dict()
    assert math.isnan(got["min"])
    assert math.isnan(got["max"])
    assert got["count"] == 2.0


def test_avg_last_k_averages_only_the_last_k_points() -> None:
    summary = MetricSummary(k=3)
    summary.add_many([100.0, 1.0, 2.0, 3.0])
    assert summary.avg_last_k == 2.0


def test_summaries_fit_job_finished_and_survive_its_json() -> None:
    summaries = Summaries(k=2)
    summaries.add_points([("loss", 2.0), ("loss", math.inf), ("acc", 0.5)])
    event = JobFinished(
        run_id="r", job_id="j", agent_id="a", outcome="succeeded", metrics=summaries.as_dict()
    )
    back = JobFinished.from_bytes(event.to_bytes())
    assert back.metrics["loss"]["max"] == math.inf
    assert back.metrics["acc"] == {
        "last": 0.5,
        "min": 0.5,
        "max": 0.5,
        "count": 1.0,
        "avg_last_k": 0.5,
    }


def test_k_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="k must be at least 1"):
        Summaries(k=0)
