"""Hyperparameter sweeps: the trials a training spec asks for, and which trial won.

Pure: a `Training` spec in, trials out; trial results in, the best trial out. A grid expands in
declaration order (the last hyperparameter varies fastest); a random search is drawn from a
seeded generator, so the same spec always gives the same trials.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ciuic_common.errors import FailedPrecondition
from ciuic_common.pipeline.models import (
    Objective,
    RangeParameter,
    Training,
    ValuesParameter,
)

Scalar = str | int | float | bool

#: The seed of a random search that does not name one: reproducible still.
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Trial:
    """One point of the sweep: its index (0-based, stable) and its resolved hyperparameters."""

    index: int
    hparams: tuple[tuple[str, Scalar], ...]

    def as_dict(self) -> dict[str, Scalar]:
        return dict(self.hparams)


def expand(training: Training) -> list[Trial]:
    """Every trial of the sweep, in order; a spec without hyperparameters is one trial."""
    params = training.hyperparameters
    if not params:
        return [Trial(0, ())]
    search = training.search or (
        "grid" if all(isinstance(p, ValuesParameter) for p in params) else "random"
    )
    if search == "grid":
        names = [p.name for p in params]
        grids = [p.values for p in params if isinstance(p, ValuesParameter)]
        if len(grids) != len(params):
            raise FailedPrecondition("a grid search needs a values list for every hyperparameter")
        return [
            Trial(i, tuple(zip(names, combo, strict=True)))
            for i, combo in enumerate(itertools.product(*grids))
        ]
    if search == "bayesian":
        raise FailedPrecondition(
            "bayesian search is not available yet; use search: random with trials: N"
        )
    if training.trials is None:
        raise FailedPrecondition("a random search needs trials: N")
    rng = random.Random(training.seed if training.seed is not None else DEFAULT_SEED)
    return [
        Trial(i, tuple((p.name, _draw(rng, p)) for p in params)) for i in range(training.trials)
    ]


def _draw(rng: random.Random, param: ValuesParameter | RangeParameter) -> Scalar:
    if isinstance(param, ValuesParameter):
        return rng.choice(param.values)
    low, high = float(param.min), float(param.max)
    if param.distribution == "int":
        return rng.randint(math.ceil(low), math.floor(high))
    if param.distribution == "log_uniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.uniform(low, high)


def objective_value(
    objective: Objective, metrics: Mapping[str, Mapping[str, float]]
) -> float | None:
    """The number a trial is ranked by, from its job's metric summary; None when it has none
    usable (never logged, or NaN/inf: a diverged trial cannot win)."""
    summary = metrics.get(objective.metric)
    if not summary:
        return None
    if objective.scope == "last":
        value = summary.get("last")
    elif objective.scope == "best":
        value = summary.get("min" if objective.mode == "min" else "max")
    else:
        value = summary.get("avg_last_k")
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def best_trial(
    objective: Objective, results: Sequence[tuple[int, Mapping[str, Mapping[str, float]]]]
) -> int | None:
    """The index of the winning trial among (index, metric summary) pairs; None when no trial
    has a usable value. Equal values go to the lowest index, so the choice is deterministic."""
    scored = [
        (value, index)
        for index, metrics in results
        if (value := objective_value(objective, metrics)) is not None
    ]
    if not scored:
        return None
    sign = 1.0 if objective.mode == "min" else -1.0
    return min(scored, key=lambda vi: (sign * vi[0], vi[1]))[1]
