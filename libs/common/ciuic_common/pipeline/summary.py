"""What a pipeline will do, in a few lines: for `ciuic validate` and for people reading runs."""

from __future__ import annotations

import heapq

from pydantic import BaseModel, ConfigDict

from ciuic_common.pipeline.models import Job, Pipeline
from ciuic_common.pipeline.units import format_percentage

__all__ = ["AlertSummary", "PipelineSummary", "ValidationStageSummary", "job_order", "summarize"]


class ValidationStageSummary(BaseModel):
    """One validation stage: its dataset, its time limit and its gates."""

    model_config = ConfigDict(frozen=True)

    name: str
    dataset: str
    timeout: str
    gates: list[str]


class AlertSummary(BaseModel):
    """One alert rule: what it watches, when it fires, what it does."""

    model_config = ConfigDict(frozen=True)

    name: str
    metric: str
    condition: str
    actions: list[str]


class PipelineSummary(BaseModel):
    """The shape of a pipeline: its stages in order and what each will use."""

    model_config = ConfigDict(frozen=True)

    name: str | None
    #: In the order the scheduler runs them, e.g. ["setup", "training", "validation:quick-check",
    #: ..., "packaging", "experiment"].
    stages: list[str]
    jobs: list[str]
    datasets: list[str]
    strategy: str | None
    nodes: int | None
    gpus_per_node: int | None
    gpus_per_trial: int | None
    trials: int
    search: str | None
    objective: str | None
    alerts: list[AlertSummary]
    validation_stages: list[ValidationStageSummary]
    deployment_formats: list[str]
    destination: str | None
    #: Percent of traffic per model version; the control first.
    experiment_split: dict[str, float]
    rollout: str | None


def job_order(jobs: dict[str, Job]) -> list[str]:
    """Job names with each job after the jobs it needs, in file order where free to choose."""
    position = {name: index for index, name in enumerate(jobs)}
    waiting_on = {name: len({n for n in job.needs if n in jobs}) for name, job in jobs.items()}
    needed_by: dict[str, list[str]] = {name: [] for name in jobs}
    for name, job in jobs.items():
        for need in {n for n in job.needs if n in jobs}:
            needed_by[need].append(name)
    ready = [(position[n], n) for n, count in waiting_on.items() if count == 0]
    heapq.heapify(ready)
    placed: list[str] = []
    while ready:
        _, name = heapq.heappop(ready)
        placed.append(name)
        for follower in needed_by[name]:
            waiting_on[follower] -= 1
            if waiting_on[follower] == 0:
                heapq.heappush(ready, (position[follower], follower))
    # Jobs in a cycle (refused by validation) keep their file order at the end.
    return placed + [name for name in jobs if name not in set(placed)]


def summarize(p: Pipeline) -> PipelineSummary:
    """The stages, trials, GPUs, alerts, validation, packaging and rollout of `p`."""
    jobs = job_order(p.jobs)
    stages = list(jobs)
    if p.data:
        stages.append("data")
    training = p.training
    if training is not None:
        stages.append("training")
    stages += [f"validation:{stage.name}" for stage in p.validation.stages] if p.validation else []
    if p.deployment is not None:
        stages.append("packaging")
    if p.experiment is not None:
        stages.append("experiment")
    if p.rollout is not None:
        stages.append(f"rollout:{p.rollout.strategy}")
    split: dict[str, float] = {}
    if p.experiment is not None:
        split[p.experiment.control] = p.experiment.control_traffic
        split.update({variant.version: variant.traffic for variant in p.experiment.variants})
    objective = None
    if training is not None:
        scope: str = training.objective.scope
        if scope == "avg_last_k":
            scope = f"mean of the last {training.objective.k}"
        objective = f"{training.objective.mode} {training.objective.metric} ({scope})"
    return PipelineSummary(
        name=p.name,
        stages=stages,
        jobs=jobs,
        datasets=list(p.data),
        strategy=training.strategy if training else None,
        nodes=training.nodes if training else None,
        gpus_per_node=training.gpus_per_node if training else None,
        gpus_per_trial=training.gpus_per_trial if training else None,
        trials=training.trial_count if training else 0,
        search=training.search if training else None,
        objective=objective,
        alerts=[
            AlertSummary(
                name=rule.name or rule.metric,
                metric=rule.metric,
                condition=rule.condition,
                actions=[action.type for action in rule.actions],
            )
            for rule in p.alerts
        ],
        validation_stages=[
            ValidationStageSummary(
                name=stage.name,
                dataset=stage.dataset,
                timeout=str(stage.timeout),
                gates=stage.gates,
            )
            for stage in (p.validation.stages if p.validation else [])
        ],
        deployment_formats=list(p.deployment.formats) if p.deployment else [],
        destination=p.deployment.destination.path if p.deployment else None,
        experiment_split=split,
        rollout=(
            p.rollout.strategy
            + (
                " " + " -> ".join(format_percentage(s) for s in p.rollout.steps)
                if p.rollout.steps
                else ""
            )
            if p.rollout
            else None
        ),
    )
