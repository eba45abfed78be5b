"""A run against its baseline: which direction is better, the verdicts with their deltas, which
earlier run is the baseline, and the objective read from the scheduler's words."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciuic_metrics_collector.compare import (
    Candidate,
    Objective,
    best_trial_fields,
    better_direction,
    choose_baseline,
    compare,
    compare_metric,
)

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 12, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("key", "better"),
    [
        ("train_loss", "min"),
        ("val/Loss", "min"),
        ("error_rate", "min"),
        ("perplexity", "min"),
        ("val_mse", "min"),
        ("p99-latency", "min"),
        ("accuracy", "max"),
        ("f1", "max"),
        ("bleu", "max"),
        ("timer", "max"),  # a word must match, not any substring
    ],
)
def test_lower_is_better_follows_the_name(key: str, better: str) -> None:
    assert better_direction(key) == better


def test_the_objective_mode_wins_over_the_name() -> None:
    assert better_direction("reward_loss", Objective("reward_loss", "max")) == "max"
    assert better_direction("accuracy", Objective("accuracy", "min")) == "min"


def test_verdicts_with_deltas() -> None:
    up = compare_metric("accuracy", 0.92, 0.90, "max")
    assert up.verdict == "improved"
    assert up.delta == pytest.approx(0.02)
    assert up.delta_pct == pytest.approx(2.0 / 0.9)
    assert compare_metric("loss", 0.5, 0.4, "min").verdict == "regressed"
    assert compare_metric("loss", 0.4, 0.4 + 1e-13, "min").verdict == "unchanged"
    assert compare_metric("loss", math.nan, 0.4, "min").verdict == "regressed"
    assert compare_metric("loss", 0.3, math.nan, "min").verdict == "improved"
    assert compare_metric("loss", math.nan, math.nan, "min").verdict == "unchanged"
    assert compare_metric("loss", math.inf, math.inf, "min").verdict == "unchanged"
    zero = compare_metric("score", 1.0, 0.0, "max")
    assert zero.verdict == "improved"
    assert math.isnan(zero.delta_pct)
    missing = compare_metric("f1", None, 0.8, "max")
    assert missing.verdict == "missing"
    assert math.isnan(missing.delta)


def test_compare_defaults_to_shared_metrics_objective_first() -> None:
    out = compare(
        {"accuracy": 0.9, "val_loss": 0.2, "only_here": 1.0},
        {"accuracy": 0.8, "val_loss": 0.3, "only_there": 2.0},
        objective=Objective("val_loss", "min"),
    )
    assert [(m.key, m.verdict) for m in out] == [
        ("val_loss", "improved"),
        ("accuracy", "improved"),
    ]
    asked = compare({"a": 1.0}, {"b": 2.0}, keys=["a", "b"])
    assert [m.verdict for m in asked] == ["missing", "missing"]


@given(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=True, allow_infinity=True),
)
def test_swapping_run_and_baseline_swaps_improved_and_regressed(a: float, b: float) -> None:
    there = compare_metric("loss", a, b, "min").verdict
    back = compare_metric("loss", b, a, "min").verdict
    swapped = {"improved": "regressed", "regressed": "improved", "unchanged": "unchanged"}
    assert back == swapped[there]


def candidate(
    run_id: str, minutes: int, value: float | None, metric: str = "val_loss"
) -> Candidate:
    return Candidate(run_id, T0 + timedelta(minutes=minutes), Objective(metric, "min"), value)


def test_the_baseline_is_the_best_earlier_run_on_the_same_objective() -> None:
    objective = Objective("val_loss", "min")
    runs = [
        candidate("old-best", 1, 0.20),
        candidate("recent", 5, 0.30),
        candidate("other-objective", 6, 0.01, metric="accuracy"),
        candidate("no-best-trial", 7, None),
        candidate("tie-recent", 4, 0.20),
    ]
    chosen, reason = choose_baseline(objective, runs, "pipeline p on main in repo")
    assert chosen is not None
    assert chosen.run_id == "tie-recent"  # ties go to the most recent
    assert "val_loss=0.2" in reason
    assert "pipeline p on main in repo" in reason
    maximise = Objective("val_loss", "max")
    runs_max = [Candidate(c.run_id, c.created_at, maximise, c.objective_value) for c in runs]
    chosen, _ = choose_baseline(maximise, runs_max, "x")
    assert chosen is not None
    assert chosen.run_id == "recent"


def test_no_baseline_says_why() -> None:
    chosen, reason = choose_baseline(Objective("val_loss", "min"), [], "pipeline p on main in r")
    assert chosen is None
    assert "no earlier run" in reason
    chosen, reason = choose_baseline(
        Objective("val_loss", "min"), [candidate("a", 1, 0.1, metric="loss")], "x"
    )
    assert chosen is None
    assert "same objective" in reason
    chosen, reason = choose_baseline(None, [candidate("a", 1, 0.1), candidate("b", 2, 0.5)], "x")
    assert chosen is not None
    assert chosen.run_id == "b"
    assert "most recent" in reason


def test_the_objective_comes_from_the_training_stage_outputs() -> None:
    fields = best_trial_fields(
        {
            "best_trial": 2,
            "best_job": "r1-trial-2",
            "objective_spec": {"metric": "val_loss", "mode": "min", "scope": "last"},
            "objective": 0.3125,
        }
    )
    assert fields == {
        "objective_metric": "val_loss",
        "objective_mode": "min",
        "objective_scope": "last",
        "objective_value": 0.3125,
        "best_trial": 2,
        "best_job": "r1-trial-2",
    }
    # The only trial of a run without the metric: the objective still, no value.
    only = best_trial_fields({"best_trial": 0, "objective_spec": {"metric": "loss", "mode": "max"}})
    assert only["objective_mode"] == "max"
    assert "objective_value" not in only
    assert best_trial_fields({}) == {}
