"""Sweeps expand to the trials the spec asks for, reproducibly, and the best trial is chosen by
the objective, ignoring diverged trials and breaking ties the same way every time."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciuic_common.errors import FailedPrecondition
from ciuic_common.pipeline import load_pipeline
from ciuic_common.pipeline.models import Objective, Training
from ciuic_scheduler.sweeps import best_trial, expand, objective_value

SEED = Path(__file__).resolve().parents[2] / "examples" / "seed" / ".ciuicci.yaml"


def training(text: str) -> Training:
    pipeline = load_pipeline(f"training:\n{text}")
    assert pipeline.training is not None
    return pipeline.training


def test_the_seed_grid_is_nine_trials_in_declaration_order() -> None:
    spec = load_pipeline(SEED.read_text()).training
    assert spec is not None
    trials = expand(spec)
    assert len(trials) == 9
    assert trials[0].as_dict() == {"learning_rate": 0.001, "batch_size": 32}
    assert trials[1].as_dict() == {"learning_rate": 0.001, "batch_size": 64}
    assert trials[8].as_dict() == {"learning_rate": 0.0001, "batch_size": 128}
    assert [t.index for t in trials] == list(range(9))


RANDOM = """
  trials: 50
  seed: 7
  hyperparameters:
    - {name: lr, min: 0.00001, max: 0.1, distribution: log_uniform}
    - {name: layers, min: 2, max: 6, distribution: int}
    - {name: dropout, min: 0.0, max: 0.5}
    - {name: optimizer, values: [adam, sgd]}
"""


def test_a_random_search_is_reproducible_and_stays_in_its_ranges() -> None:
    first, again = expand(training(RANDOM)), expand(training(RANDOM))
    assert first == again
    assert len(first) == 50
    for trial in first:
        h = trial.as_dict()
        assert 0.00001 <= float(h["lr"]) <= 0.1
        assert isinstance(h["layers"], int)
        assert 2 <= h["layers"] <= 6
        assert 0.0 <= float(h["dropout"]) <= 0.5
        assert h["optimizer"] in ("adam", "sgd")
    other_seed = expand(training(RANDOM.replace("seed: 7", "seed: 8")))
    assert other_seed != first


def test_log_uniform_draws_spread_over_orders_of_magnitude() -> None:
    lrs = [float(t.as_dict()["lr"]) for t in expand(training(RANDOM.replace("50", "400")))]
    decades = {math.floor(math.log10(x)) for x in lrs}
    assert decades >= {-5, -4, -3, -2}


def test_no_hyperparameters_is_a_single_trial() -> None:
    assert [t.as_dict() for t in expand(training("  nodes: 1"))] == [{}]


def test_bayesian_search_is_refused_clearly_until_it_exists() -> None:
    spec = training(RANDOM + "  search: bayesian\n")
    with pytest.raises(FailedPrecondition, match="bayesian"):
        expand(spec)


@given(st.lists(st.integers(1, 4), min_size=1, max_size=4))
@settings(max_examples=50, deadline=None)
def test_a_grid_has_the_product_of_its_sizes_and_no_repeats(sizes: list[int]) -> None:
    lines = "".join(
        f"    - {{name: p{i}, values: {list(range(n))}}}\n" for i, n in enumerate(sizes)
    )
    trials = expand(training(f"  hyperparameters:\n{lines}"))
    assert len(trials) == math.prod(sizes)
    assert len({t.hparams for t in trials}) == len(trials)


LOSS_MIN = Objective(metric="loss", mode="min")


def summary(
    last: float, best: float | None = None, avg: float | None = None
) -> dict[str, dict[str, float]]:
    s = {"last": last, "min": best if best is not None else last, "max": last, "count": 10.0}
    if avg is not None:
        s["avg_last_k"] = avg
    return {"loss": s}


def test_the_best_trial_follows_the_objective_and_scope() -> None:
    results = [(0, summary(0.5, best=0.1)), (1, summary(0.3, best=0.3)), (2, summary(0.4))]
    assert best_trial(LOSS_MIN, results) == 1
    assert best_trial(Objective(metric="loss", mode="min", scope="best"), results) == 0
    assert best_trial(Objective(metric="loss", mode="max"), results) == 0


def test_diverged_and_silent_trials_never_win() -> None:
    results = [(0, summary(float("nan"))), (1, summary(float("-inf"))), (2, {}), (3, summary(9.0))]
    assert best_trial(LOSS_MIN, results) == 3
    assert best_trial(LOSS_MIN, [(0, summary(float("nan")))]) is None


def test_avg_last_k_uses_the_agents_mean_of_the_last_points() -> None:
    objective = Objective(metric="loss", mode="min", scope="avg_last_k", k=5)
    assert objective_value(objective, summary(0.1, avg=0.4)) == 0.4
    assert objective_value(objective, summary(0.1)) is None


@given(st.lists(st.sampled_from([0.1, 0.2, 0.3]), min_size=1, max_size=12))
@settings(max_examples=100, deadline=None)
def test_ties_go_to_the_lowest_trial_index(values: list[float]) -> None:
    results = [(i, summary(v)) for i, v in enumerate(values)]
    winner = best_trial(LOSS_MIN, list(reversed(results)))
    assert winner == values.index(min(values))
