"""Pure: which earlier run is a run's baseline, and how each metric moved against it.

Direction: a metric is lower-is-better when it is the run's objective with mode `min`, or when
its name says so: it contains `loss`, `error` or `perplexity`, or one of its words (split on
`_ . - /` and spaces) is `err`, `mse`, `mae`, `rmse`, `wer`, `cer`, `nll`, `ppl`, `latency` or
`regret`. Everything else (accuracy, f1, auc, bleu, reward...) is higher-is-better. The objective's
own mode wins over the name.

Verdicts: `unchanged` when the values are equal within a relative 1e-9 (both NaN, or the same
infinity, count as equal); otherwise `improved` or `regressed` by the direction; a NaN is worse
than any number; `missing` when either side never logged the metric.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

__all__ = [
    "UNCHANGED_TOLERANCE",
    "Candidate",
    "MetricVerdict",
    "Objective",
    "better_direction",
    "choose_baseline",
    "compare",
    "compare_metric",
]

Direction = Literal["min", "max"]
VerdictName = Literal["improved", "regressed", "unchanged", "missing"]

#: Relative difference under which two values are `unchanged` (rounding noise, not progress).
UNCHANGED_TOLERANCE = 1e-9

_LOWER_SUBSTRINGS = ("loss", "error", "perplexity")
_LOWER_WORDS = frozenset(
    {"err", "mse", "mae", "rmse", "wer", "cer", "nll", "ppl", "latency", "regret"}
)
_WORD = re.compile(r"[_.\-/\s]+")


@dataclass(frozen=True, slots=True)
class Objective:
    """A run's training objective: the metric its trials were ranked by, and the mode."""

    metric: str
    mode: Direction


@dataclass(frozen=True, slots=True)
class MetricVerdict:
    key: str
    value: float | None
    baseline: float | None
    delta: float
    delta_pct: float
    better: Direction
    verdict: VerdictName


@dataclass(frozen=True, slots=True)
class Candidate:
    """An earlier run that could be the baseline (same repository, pipeline and branch)."""

    run_id: str
    created_at: datetime
    objective: Objective | None
    #: The objective's value of its best trial; None when its training has not chosen one.
    objective_value: float | None


def better_direction(key: str, objective: Objective | None = None) -> Direction:
    """Whether lower (`min`) or higher (`max`) values of `key` are better."""
    if objective is not None and objective.metric == key:
        return objective.mode
    name = key.lower()
    if any(s in name for s in _LOWER_SUBSTRINGS):
        return "min"
    if any(word in _LOWER_WORDS for word in _WORD.split(name)):
        return "min"
    return "max"


def _equal(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= UNCHANGED_TOLERANCE * max(1.0, abs(a), abs(b))


def compare_metric(
    key: str, value: float | None, baseline: float | None, better: Direction
) -> MetricVerdict:
    """One metric of a run against its baseline's."""
    if value is None or baseline is None:
        return MetricVerdict(key, value, baseline, math.nan, math.nan, better, "missing")
    delta = value - baseline if not _equal(value, baseline) else 0.0
    finite_base = math.isfinite(baseline) and baseline != 0
    delta_pct = delta / abs(baseline) * 100 if finite_base else math.nan
    if _equal(value, baseline):
        verdict: VerdictName = "unchanged"
    elif math.isnan(value):
        verdict = "regressed"
    elif math.isnan(baseline):
        verdict = "improved"
    else:
        improved = value < baseline if better == "min" else value > baseline
        verdict = "improved" if improved else "regressed"
    return MetricVerdict(key, value, baseline, delta, delta_pct, better, verdict)


def compare(
    values: Mapping[str, float],
    baseline: Mapping[str, float],
    keys: Iterable[str] = (),
    objective: Objective | None = None,
) -> list[MetricVerdict]:
    """Every metric of `keys` (default: those both sides logged), sorted by name, the
    objective first."""
    wanted = sorted(set(keys)) or sorted(set(values) & set(baseline))
    if objective is not None and objective.metric in wanted:
        wanted.remove(objective.metric)
        wanted.insert(0, objective.metric)
    return [
        compare_metric(k, values.get(k), baseline.get(k), better_direction(k, objective))
        for k in wanted
    ]


def choose_baseline(
    objective: Objective | None, candidates: Sequence[Candidate], where: str
) -> tuple[Candidate | None, str]:
    """The baseline among earlier runs of the same repository, pipeline and branch (`where`
    says which, for the reason), and the reason in words.

    With an objective: the run with the best value of that same objective (same metric and
    mode; ties go to the most recent). Without one: the most recent run.
    """
    if not candidates:
        return None, f"no earlier run of {where} to compare with"
    newest_first = sorted(candidates, key=lambda c: c.created_at, reverse=True)
    if objective is None:
        chosen = newest_first[0]
        return chosen, f"the most recent earlier run of {where} (this run has no objective)"
    same = [
        c
        for c in newest_first
        if c.objective == objective
        and c.objective_value is not None
        and not math.isnan(c.objective_value)
    ]
    if not same:
        return None, (
            f"no earlier run of {where} has a best trial on the same objective "
            f"({objective.metric}, {objective.mode}); {len(candidates)} earlier run(s) considered"
        )
    sign = 1.0 if objective.mode == "min" else -1.0
    # min() keeps the first of equals: the most recent, as the list is newest first.
    chosen = min(same, key=lambda c: sign * (c.objective_value or 0.0))
    return chosen, (
        f"the best earlier run of {where} by {objective.metric} ({objective.mode}): "
        f"{objective.metric}={chosen.objective_value:.6g}, out of {len(same)} run(s) "
        "on the same objective"
    )


def best_trial_fields(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """What a succeeded training stage's outputs (RunStageChanged.outputs) say of its sweep, as
    the run's fields: the objective it was chosen by, the value, the best trial and its job."""
    spec = outputs.get("objective_spec")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("metric"), str):
        return {}
    fields: dict[str, Any] = {
        "objective_metric": spec["metric"],
        "objective_mode": "max" if spec.get("mode") == "max" else "min",
        "objective_scope": str(spec.get("scope", "last")),
    }
    value = outputs.get("objective")
    if isinstance(value, int | float) and not isinstance(value, bool):
        fields["objective_value"] = float(value)
    if isinstance(outputs.get("best_trial"), int):
        fields["best_trial"] = outputs["best_trial"]
    if isinstance(outputs.get("best_job"), str):
        fields["best_job"] = outputs["best_job"]
    return fields
