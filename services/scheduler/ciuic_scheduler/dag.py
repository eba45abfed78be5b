"""A pipeline as a DAG of stages and the jobs in them, and how a run moves through it.

Pure: a validated `Pipeline` in, a `RunPlan` out; stage states in, what happens next out.

Stages, in the order DESIGN.md gives them:
- one `job` stage per entry of `jobs:`, ordered by their `needs`;
- `data` (every dataset of `data:`), after the jobs: the data_versioner resolves each dataset to
  a version; the scheduler waits for it;
- `training`: every trial of the sweep, after data (or the jobs); it ends by choosing the best
  trial by the objective;
- one `validation` stage per entry of `validation.stages`, in order: the evaluation runs as a job
  on the best trial's model, then the stage's gates decide;
- `packaging` (when `deployment:` names formats and a destination): the packager's;
- `deployment` (when `experiment:` or `rollout:` is given): the traffic router's.
A stage that another service carries out waits for it in the `waiting` state, named, so a run
never skips it silently; it moves on when that service reports back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ciuic_common.expressions import ExpressionError, evaluate, format_value, parse
from ciuic_common.pipeline.models import CacheStep, Pipeline, Training
from ciuic_scheduler.sweeps import expand

StageKind = Literal["job", "data", "training", "validation", "packaging", "deployment"]
JobKind = Literal["job", "trial", "validation"]

#: Which service carries out the stages the scheduler does not run itself.
SERVICE_OF: dict[str, str] = {
    "data": "data_versioner",
    "packaging": "packager",
    "deployment": "traffic_router",
}
#: Gates that compare with history need the metrics collector's baseline.
BASELINE_SERVICE = "metrics_collector"

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class StagePlan:
    name: str
    kind: StageKind
    needs: tuple[str, ...] = ()
    timeout_s: float | None = None
    #: What the stage is given: datasets for `data`, gates for `validation`, formats for
    #: `packaging`...
    inputs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def service(self) -> str | None:
        return SERVICE_OF.get(self.kind)


@dataclass(frozen=True)
class JobPlan:
    """One job of a stage as planned at the run's creation (validation jobs get the best
    trial's hyperparameters and checkpoint when their stage starts)."""

    stage: str
    kind: JobKind
    name: str
    steps: tuple[Mapping[str, Any], ...]
    trial: int | None = None
    hparams: Mapping[str, Any] = field(default_factory=dict)
    nodes: int = 1
    gpus_per_node: int = 0
    millicores: int = 0
    memory_mib: int = 0
    strategy: Literal["ddp", "horovod", "none"] = "none"
    timeout_s: float | None = None
    max_retries: int = 0
    container: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def capability(self) -> str | None:
        """What every agent of the job must offer: its distributed strategy, when it runs more
        than one process (a single process needs no launcher)."""
        if self.strategy == "none" or (self.nodes == 1 and self.gpus_per_node <= 1):
            return None
        return self.strategy

    @property
    def slug(self) -> str:
        """The job's part of its id, unique in the run."""
        return f"trial-{self.trial}" if self.trial is not None else self.name


@dataclass(frozen=True)
class RunPlan:
    stages: tuple[StagePlan, ...]
    jobs: tuple[JobPlan, ...]

    @property
    def trials(self) -> int:
        return sum(1 for job in self.jobs if job.kind == "trial")

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)


def plan_run(pipeline: Pipeline) -> RunPlan:
    """Every stage and job of a run of `pipeline`, stages in a valid order."""
    stages: list[StagePlan] = []
    jobs: list[JobPlan] = []
    taken = set(pipeline.jobs)

    def name_for(kind: str, wanted: str) -> str:
        # A user's job may be called `training` or `data`: the platform's stage yields.
        name = wanted if wanted not in taken else f"{kind}:{wanted}"
        taken.add(name)
        return name

    for job_name in _in_need_order(pipeline):
        job = pipeline.jobs[job_name]
        stages.append(StagePlan(job_name, "job", tuple(job.needs), _seconds(job.timeout)))
        jobs.append(
            JobPlan(
                stage=job_name,
                kind="job",
                name=job_name,
                steps=tuple(s.model_dump(mode="json", exclude_none=True) for s in job.steps),
                gpus_per_node=job.resources.gpus,
                millicores=round((job.resources.cpu or 0) * 1000),
                memory_mib=(job.resources.memory or 0) // (1024 * 1024),
                timeout_s=_seconds(job.timeout),
                container=job.container,
                env=dict(job.env),
            )
        )
    previous: tuple[str, ...] = tuple(pipeline.jobs)
    # The environment the jobs built (their `cache:` steps: a venv keyed by hashFiles) is the
    # one training and evaluation run in: their agents restore it before the command.
    environment = tuple(
        step.model_dump(mode="json", exclude_none=True)
        for job in pipeline.jobs.values()
        for step in job.steps
        if isinstance(step, CacheStep)
    )

    if pipeline.data:
        name = name_for("data", "data")
        datasets = {
            k: v.model_dump(mode="json", exclude_none=True) for k, v in pipeline.data.items()
        }
        stages.append(StagePlan(name, "data", previous, inputs={"datasets": datasets}))
        previous = (name,)

    training = pipeline.training
    if training is not None:
        name = name_for("training", "training")
        stages.append(
            StagePlan(
                name,
                "training",
                previous,
                inputs={
                    "objective": training.objective.model_dump(mode="json", exclude_none=True),
                    "max_concurrent_trials": training.max_concurrent_trials,
                    "early_stopping": training.early_stopping is not None,
                },
            )
        )
        jobs.extend(_trials(name, training, environment))
        previous = (name,)

    if pipeline.validation is not None:
        gpus = 1 if training is not None and training.gpus_per_node > 0 else 0
        for spec in pipeline.validation.stages:
            name = name_for("validation", spec.name)
            timeout = _seconds(spec.timeout)
            stages.append(
                StagePlan(
                    name,
                    "validation",
                    previous,
                    timeout,
                    inputs={"dataset": spec.dataset, "gates": list(spec.gates)},
                )
            )
            jobs.append(
                JobPlan(
                    stage=name,
                    kind="validation",
                    name=spec.name,
                    steps=(*environment, {"run": spec.command}),
                    gpus_per_node=gpus,
                    timeout_s=timeout,
                    container=training.container if training else None,
                    env=dict(training.env) if training else {},
                )
            )
            previous = (name,)

    if pipeline.deployment is not None:
        name = name_for("packaging", "packaging")
        inputs = pipeline.deployment.model_dump(mode="json", exclude_none=True)
        stages.append(StagePlan(name, "packaging", previous, inputs=inputs))
        previous = (name,)

    if pipeline.experiment is not None or pipeline.rollout is not None:
        name = name_for("deployment", "deployment")
        inputs = {
            key: part.model_dump(mode="json", exclude_none=True)
            for key, part in (("experiment", pipeline.experiment), ("rollout", pipeline.rollout))
            if part is not None
        }
        stages.append(StagePlan(name, "deployment", previous, inputs=inputs))

    return RunPlan(tuple(stages), tuple(jobs))


def _trials(
    stage: str, training: Training, environment: tuple[Mapping[str, Any], ...]
) -> list[JobPlan]:
    timeout = _seconds(training.timeout)
    return [
        JobPlan(
            stage=stage,
            kind="trial",
            name="training",
            steps=(*environment, {"run": training.command}),
            trial=trial.index,
            hparams=trial.as_dict(),
            nodes=training.nodes,
            gpus_per_node=training.gpus_per_node,
            strategy=training.strategy,
            timeout_s=timeout,
            max_retries=training.max_retries,
            container=training.container,
            env=dict(training.env),
        )
        for trial in expand(training)
    ]


def _in_need_order(pipeline: Pipeline) -> list[str]:
    """Job names so that each comes after what it needs (the file's order where free)."""
    done: list[str] = []
    placed: set[str] = set()
    remaining = list(pipeline.jobs)
    while remaining:
        # The pipeline validated: no cycles and no unknown needs, so this always progresses.
        ready = [n for n in remaining if set(pipeline.jobs[n].needs) <= placed]
        for name in ready:
            done.append(name)
            placed.add(name)
        remaining = [n for n in remaining if n not in placed]
    return done


def _seconds(duration: Any) -> float | None:
    return None if duration is None else float(duration.total_seconds())


# --- moving through the DAG ----------------------------------------------------------------


@dataclass(frozen=True)
class StageView:
    """What the progression needs to know of a stage."""

    name: str
    state: str
    needs: tuple[str, ...] = ()
    reason: str | None = None


def ready(stages: Sequence[StageView]) -> list[str]:
    """Pending stages whose every need succeeded, in stage order."""
    state = {s.name: s.state for s in stages}
    return [
        s.name
        for s in stages
        if s.state == "pending" and all(state[n] == "succeeded" for n in s.needs)
    ]


def blocked(stages: Sequence[StageView]) -> list[tuple[str, str]]:
    """Pending stages that can never run because a need failed or was cancelled, with why.

    Applied repeatedly (as the scheduler does), a failure reaches every stage downstream."""
    by_name = {s.name: s for s in stages}
    out = []
    for s in stages:
        if s.state != "pending":
            continue
        for need in s.needs:
            upstream = by_name[need]
            if upstream.state in ("failed", "cancelled"):
                cause = f": {upstream.reason}" if upstream.reason else ""
                out.append((s.name, f"needs {need}, which {upstream.state}{cause}"))
                break
    return out


def outcome(stages: Sequence[StageView]) -> tuple[str, str | None] | None:
    """The run's end once every stage is terminal: (state, reason); None while it goes on."""
    if any(s.state not in TERMINAL for s in stages):
        return None
    if failed := [s for s in stages if s.state == "failed"]:
        first = failed[0]
        return "failed", f"{first.name}: {first.reason}" if first.reason else first.name
    if any(s.state == "cancelled" for s in stages):
        return "cancelled", next(s.reason for s in stages if s.state == "cancelled")
    return "succeeded", None


# --- validation gates ----------------------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool
    detail: str


def _number(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else format_value(value)


def gate_metrics(gate: str) -> list[str]:
    """The metrics a gate names (`accuracy` in `accuracy >= baseline - 0.01`)."""
    names = parse(gate).names()
    plain = {n for n in names if n != "baseline" and not n.startswith("baseline.")}
    return sorted(plain | {n.removeprefix("baseline.") for n in names if n.startswith("baseline.")})


def needs_baseline(gate: str) -> bool:
    """Whether the gate compares with history (`baseline`, `baseline.<metric>`)."""
    return any(n == "baseline" or n.startswith("baseline.") for n in parse(gate).names())


def evaluate_gates(
    gates: Sequence[str],
    metrics: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, float] | None = None,
    *,
    no_baseline: str | None = None,
) -> list[GateResult]:
    """Each gate against the evaluation's metric summaries (the `last` value of each metric)
    and, for gates that name it, the baseline; the detail gives the numbers. With
    `no_baseline` (why there is none: a first run), gates on the baseline pass and say so."""
    values = {k: v["last"] for k, v in metrics.items() if "last" in v}
    results = []
    for gate in gates:
        expr = parse(gate)
        names = sorted(expr.names())
        metric_names = [n for n in names if n != "baseline" and not n.startswith("baseline.")]
        missing = [n for n in metric_names if n not in values]
        if missing:
            logged = ", ".join(sorted(values)) or "none"
            results.append(
                GateResult(
                    gate, False, f"{gate}: {', '.join(missing)} not logged (logged: {logged})"
                )
            )
            continue
        variables: dict[str, object] = dict(values)
        if needs_baseline(gate):
            if no_baseline is not None:
                results.append(GateResult(gate, True, f"{gate}: no baseline ({no_baseline})"))
                continue
            if baseline is None:
                results.append(GateResult(gate, False, f"{gate}: no baseline"))
                continue
            if "baseline" in names and len(metric_names) == 1:
                variables["baseline"] = baseline.get(metric_names[0], math.nan)
            else:
                variables["baseline"] = dict(baseline)
        try:
            passed = evaluate(expr, variables) is True
        except ExpressionError as exc:
            results.append(GateResult(gate, False, f"{gate}: {exc}"))
            continue
        shown = ", ".join(f"{n}={_number(values[n])}" for n in metric_names)
        if "baseline" in variables and not isinstance(variables["baseline"], dict):
            shown += f", baseline={_number(variables['baseline'])}"
        results.append(
            GateResult(gate, passed, f"{gate} ({shown}): {'pass' if passed else 'FAIL'}")
        )
    return results
