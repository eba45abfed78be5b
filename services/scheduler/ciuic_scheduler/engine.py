"""The active scheduler: runs move through their DAGs, jobs are placed, followed and retried.

Only the replica holding the leader lock runs an `Engine` (see service.py). It keeps the cluster
and the queue in memory for placement and PostgreSQL as the truth: every change is one
transaction, fenced by the leader's term, that writes the new state and its events (through the
outbox) together; memory follows once the transaction commits. One lock serialises handlers and
the periodic tick, so memory and the database never disagree mid-change.

Job lifecycle: pending → queued → assigned (nodes chosen, commands sent) → running (every node's
agent accepted) → succeeded | failed | stopped | timed_out | lost | cancelled. A failed or lost
attempt goes back to the queue while failures ≤ max_retries (lost agents excluded, resuming
from the job's last checkpoint); an assignment that is not accepted in time goes back to the
queue away from the silent agents without counting as a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from ciuic_common.db import Connection, Database
from ciuic_common.errors import CiuicError
from ciuic_common.events import (
    AgentHeartbeat,
    AgentLost,
    AgentRegistered,
    BaselineResolved,
    DataVersionReady,
    Event,
    Inventory,
    JobAccepted,
    JobAssigned,
    JobChanged,
    JobFinished,
    JobStarted,
    JobStop,
    JobWork,
    ModelRegistered,
    PipelineRequested,
    RunCreated,
    RunFinished,
    RunStageChanged,
)
from ciuic_common.logging import get_logger
from ciuic_common.outbox import Outbox
from ciuic_common.pipeline.models import Objective, Pipeline
from ciuic_scheduler import store
from ciuic_scheduler.dag import (
    BASELINE_SERVICE,
    TERMINAL,
    StageView,
    blocked,
    evaluate_gates,
    gate_metrics,
    needs_baseline,
    outcome,
    plan_run,
    ready,
)
from ciuic_scheduler.placement import (
    Agent,
    ClusterState,
    Gpu,
    JobQueue,
    JobRequest,
    NodeAssignment,
    Placement,
    feasible,
    schedule,
)
from ciuic_scheduler.store import Deposed, JobRow, NodeRow, RunRow, StageRow
from ciuic_scheduler.sweeps import best_trial, objective_value

log = get_logger(__name__)

SCHEDULER = "scheduler"
RENDEZVOUS_PORTS = (29500, 2000)  # first port, how many: torchrun's default and above


@dataclass(frozen=True)
class Timing:
    """How long the scheduler waits before it acts on silence."""

    #: An agent must accept an assignment within this, or the job goes elsewhere.
    ack_timeout: float = 15.0
    #: An agent silent this long is lost; its jobs are requeued.
    agent_lost_after: float = 10.0
    #: The agents' SIGTERM-to-SIGKILL grace; a stop unconfirmed after it (plus ack_timeout) is
    #: taken as done.
    stop_grace: float = 30.0
    #: The most time between two placement passes and timeout checks.
    tick_interval: float = 0.5
    #: How often the latest heartbeats are written to the database (for `ciuic agents`).
    heartbeat_flush: float = 2.0


# --- agents as heartbeats tell them ---------------------------------------------------------


class AgentMonitor:
    """What every replica hears from agents: when each spoke last and what it reported.

    Fed by heartbeats on all replicas, so a standby that takes over knows the cluster at once.
    """

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}  # monotonic
        self.seen_at: dict[str, datetime] = {}
        self.inventories: dict[str, Inventory] = {}
        self.running: dict[str, list[str]] = {}

    def heard(self, agent_id: str, inventory: Inventory, running: Sequence[str]) -> bool:
        """Record a report; True when what placement depends on changed."""
        before = self.inventories.get(agent_id)
        self.seen[agent_id] = time.monotonic()
        self.seen_at[agent_id] = datetime.now(UTC)
        self.inventories[agent_id] = inventory
        self.running[agent_id] = list(running)
        return before is None or _shape(before) != _shape(inventory)

    def silent_for(self, agent_id: str) -> float:
        return time.monotonic() - self.seen.get(agent_id, time.monotonic())

    def forget(self, agent_id: str) -> None:
        self.seen.pop(agent_id, None)


def _shape(inventory: Inventory) -> tuple[Any, ...]:
    return (
        tuple((g.index, g.busy_foreign) for g in inventory.gpus),
        tuple(map(tuple, inventory.interconnect_groups)),
        inventory.millicores,
        inventory.memory_mib,
        tuple(sorted(inventory.capabilities)),
    )


def placement_agent(agent_id: str, inventory: Inventory) -> Agent:
    """The placement model of an agent from its report."""
    return Agent(
        agent_id,
        tuple(
            Gpu(g.index, g.uuid, g.model, g.memory_total_mib, g.memory_used_mib, g.busy_foreign)
            for g in inventory.gpus
        ),
        inventory.millicores,
        inventory.memory_mib,
        frozenset(inventory.capabilities),
        tuple(tuple(group) for group in inventory.interconnect_groups),
        inventory.simulated,
    )


def request_of(job: JobRow) -> JobRequest:
    return JobRequest(
        job.id,
        job.project,
        nodes=job.nodes,
        gpus_per_node=job.gpus_per_node,
        millicores_per_node=job.millicores,
        memory_mib_per_node=job.memory_mib,
        priority=job.priority,
        capability=job.capability,
        submitted_at=job.queued_at.timestamp() if job.queued_at else time.time(),
        runtime_estimate_s=job.runtime_estimate_s,
        excluded_agents=frozenset(job.excluded_agents),
    )


# --- what a transaction changes in memory once it commits -------------------------------------


@dataclass
class _Effects:
    queued: list[JobRequest] = field(default_factory=list)
    dequeued: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


class Engine:
    """The active replica's scheduler. See the module docstring."""

    def __init__(
        self,
        db: Database,
        outbox: Outbox,
        monitor: AgentMonitor,
        *,
        identity: str,
        bucket: str,
        timing: Timing | None = None,
    ) -> None:
        self.db = db
        self.outbox = outbox
        self.monitor = monitor
        self.identity = identity
        self.bucket = bucket
        self.timing = timing or Timing()
        self.term: int | None = None
        self._lock_revision = 0
        #: Set once this replica leads and has loaded the live state: the consumers' gate.
        self.leading = asyncio.Event()
        self.cluster = ClusterState()
        self.queue = JobQueue()
        self._mutex = asyncio.Lock()
        self._wake = asyncio.Event()
        self._refresh: set[str] = set()  # agents whose heartbeat changed what placement sees
        self._stalled: dict[str, str] = {}  # job -> the reason last written
        self._flushed = 0.0

    @property
    def active(self) -> bool:
        return self.term is not None

    def wake(self) -> None:
        self._wake.set()

    # -- leadership ------------------------------------------------------------------------------

    async def take_over(self, lock_revision: int) -> None:
        """Become the active scheduler: open a new term in PostgreSQL (its fencing token), then
        load the live state. `lock_revision` is the leader lock's, for the logs."""
        async with self._mutex:
            async with self.db.connection() as conn:
                term = await store.claim_term(conn, self.identity)
            self.term = term
            self._lock_revision = lock_revision
            await self._load()
            self.leading.set()
        log.info(
            "scheduler_active",
            term=term,
            lock_revision=lock_revision,
            agents=len(self.cluster.agents),
            running=len(self.cluster.allocations),
            queued=len(self.queue),
        )
        self.wake()

    async def step_down(self, lock_revision: int) -> None:
        self.leading.clear()
        async with self._mutex:
            if self._lock_revision == lock_revision:
                self.term = None
                self.cluster = ClusterState()
                self.queue = JobQueue()
                self._stalled.clear()
        log.info("scheduler_standby", lock_revision=lock_revision)

    async def _load(self) -> None:
        async with self.db.connection() as conn:
            agent_rows = await store.agents(conn, include_lost=False)
            jobs = await store.live_jobs(conn)
            nodes = await store.nodes_of_jobs(
                conn, [j.id for j in jobs if j.state in ("assigned", "running")]
            )
        cluster = ClusterState()
        for row in agent_rows:
            inventory = self.monitor.inventories.get(row.id) or Inventory.model_validate(
                row.inventory
            )
            self._register(cluster, row.id, inventory)
            if row.id not in self.monitor.seen:
                # Not heard by this replica yet: count its silence from now, not from never.
                self.monitor.seen[row.id] = time.monotonic()
        queue = JobQueue()
        for job in jobs:
            if job.state == "queued":
                queue.add(request_of(job))
                continue
            placed = tuple(NodeAssignment(n.agent_id, tuple(n.gpus)) for n in nodes[job.id])
            if not all(n.agent_id in cluster.agents for n in placed):
                continue  # an agent of it is lost: the next tick ends the attempt
            started = job.started_at or job.assigned_at or job.queued_at
            at = started.timestamp() if started else time.time()
            try:
                cluster.start([Placement(request_of(job), placed)], at)
            except Exception as exc:  # inconsistent with what agents report now
                log.warning("allocation_not_restored", job_id=job.id, error=repr(exc))
        self.cluster, self.queue = cluster, queue

    def _register(self, cluster: ClusterState, agent_id: str, inventory: Inventory) -> bool:
        try:
            cluster.register(placement_agent(agent_id, inventory))
        except Exception as exc:
            log.warning("agent_report_refused", agent_id=agent_id, error=repr(exc))
            return False
        return True

    # -- transactions ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _change(self) -> AsyncIterator[tuple[Connection, _Effects]]:
        """One fenced transaction; its events go out through the outbox with it, and memory
        follows once it has committed."""
        term = self.term
        if term is None:
            raise Deposed("this replica is not the active scheduler")
        fx = _Effects()
        async with self.db.transaction() as tx:
            await store.fence(tx, term)
            yield tx, fx
            if fx.events:
                await self.outbox.add(tx, *fx.events)
        self._apply(fx)

    def _apply(self, fx: _Effects) -> None:
        now = time.time()
        for job_id in fx.released:
            if job_id in self.cluster.allocations:
                self.cluster.finish(job_id, now)
        for job_id in fx.dequeued:
            if job_id in self.queue:
                self.queue.remove(job_id)
        for request in fx.queued:
            if request.job_id in self.queue:
                self.queue.remove(request.job_id)
            self.queue.add(request)
        if fx.released or fx.queued:
            self.wake()

    # -- runs -----------------------------------------------------------------------------------

    async def on_pipeline_requested(self, event: PipelineRequested) -> None:
        """Create the run and its DAG, and start what can start."""
        run_id = uuid.uuid4().hex[:12]
        try:
            pipeline = Pipeline.model_validate(event.spec)
            plan = plan_run(pipeline)
        except (ValidationError, CiuicError) as exc:
            # The trigger validated it, but this scheduler cannot run it (a newer file format,
            # a search not supported yet): a failed run that says why, not a lost request.
            await self._unrunnable(event, run_id, exc)
            return
        async with self._mutex, self._change() as (tx, fx):
            created = await store.insert_run(
                tx,
                run_id=run_id,
                request_event_id=event.event_id,
                repository=event.repository,
                commit=event.commit,
                ref=event.ref,
                pipeline=pipeline.name,
                pusher=event.pusher,
                spec=event.spec,
            )
            if not created:
                log.info("run_exists", request=event.event_id)
                return
            await store.insert_stages(
                tx,
                run_id,
                (
                    {
                        "name": s.name,
                        "position": i,
                        "kind": s.kind,
                        "needs": s.needs,
                        "service": s.service,
                        "timeout_s": s.timeout_s,
                        "inputs": dict(s.inputs),
                    }
                    for i, s in enumerate(plan.stages)
                ),
            )
            slugs: set[str] = set()
            rows = []
            for job in plan.jobs:
                slug = job.slug if job.kind == "trial" else job.stage.replace(":", "-")
                while slug in slugs:
                    slug += "_"
                slugs.add(slug)
                job_id = f"{run_id}-{slug}"
                work = JobWork(
                    kind=job.kind,
                    name=job.name,
                    repository=event.repository,
                    commit=event.commit,
                    ref=event.ref,
                    steps=[dict(s) for s in job.steps],
                    container=job.container,
                    env=dict(job.env),
                    hparams=dict(job.hparams),
                    timeout_s=job.timeout_s,
                    strategy=job.strategy,
                    nodes=job.nodes,
                    gpus_per_node=job.gpus_per_node,
                    output_prefix=f"s3://{self.bucket}/runs/{run_id}/{job_id}/",
                )
                rows.append(
                    {
                        "id": job_id,
                        "run_id": run_id,
                        "stage": job.stage,
                        "kind": job.kind,
                        "name": job.name,
                        "trial": job.trial,
                        "hparams": dict(job.hparams),
                        "project": event.repository,
                        "priority": 0,
                        "nodes": job.nodes,
                        "gpus_per_node": job.gpus_per_node,
                        "millicores": job.millicores,
                        "memory_mib": job.memory_mib,
                        "capability": job.capability,
                        "max_retries": job.max_retries,
                        "work": work.model_dump(mode="json"),
                        "timeout_s": job.timeout_s,
                    }
                )
            await store.insert_jobs(tx, rows)
            fx.events.append(
                RunCreated(
                    run_id=run_id,
                    repository=event.repository,
                    commit=event.commit,
                    ref=event.ref,
                    pipeline=pipeline.name,
                    stages=[s.name for s in plan.stages],
                    trials=plan.trials,
                )
            )
            log.info("run_created", run_id=run_id, stages=len(plan.stages), jobs=len(rows))
            await self._advance(tx, fx, run_id)

    async def _unrunnable(self, event: PipelineRequested, run_id: str, exc: Exception) -> None:
        reason = f"the scheduler cannot run this pipeline: {exc}"
        async with self._mutex, self._change() as (tx, fx):
            created = await store.insert_run(
                tx,
                run_id=run_id,
                request_event_id=event.event_id,
                repository=event.repository,
                commit=event.commit,
                ref=event.ref,
                pipeline=event.spec.get("name") if isinstance(event.spec, dict) else None,
                pusher=event.pusher,
                spec=event.spec,
            )
            if not created:
                return
            await store.finish_run(tx, run_id, "failed", reason)
            fx.events.append(
                RunCreated(
                    run_id=run_id, repository=event.repository, commit=event.commit, ref=event.ref
                )
            )
            fx.events.append(RunFinished(run_id=run_id, outcome="failed", reason=reason))
        log.warning("run_unrunnable", run_id=run_id, reason=reason)

    async def _advance(self, tx: Connection, fx: _Effects, run_id: str) -> None:
        """Move the run as far as its jobs allow: end finished stages, fail what can no longer
        run, start what is ready, and end the run when every stage has."""
        run = await store.lock_run(tx, run_id)
        if run is None or run.state != "running":
            return
        stages = (await store.stages_of(tx, [run_id]))[run_id]
        jobs = await store.jobs_of_run(tx, run_id)
        by_stage: dict[str, list[JobRow]] = defaultdict(list)
        for job in jobs:
            by_stage[job.stage].append(job)
        by_name = {s.name: s for s in stages}

        async def move(stage: StageRow, state: str, reason: str | None, **kw: Any) -> None:
            if state in TERMINAL:
                await self._close_stage(tx, fx, stage, by_stage[stage.name], reason)
            await self._set_stage(tx, fx, stage, state, reason, **kw)

        changed = True
        while changed:
            changed = False
            for stage in stages:
                if stage.state in ("queued", "running"):
                    result = await self._stage_progress(
                        tx, fx, run, stage, by_stage[stage.name], by_name
                    )
                    if result is not None:
                        state, reason, extra = result
                        await move(stage, state, reason, **extra)
                        changed = True
            for name, why in blocked([_view(s) for s in stages]):
                await move(by_name[name], "failed", why)
                changed = True
            for name in ready([_view(s) for s in stages]):
                stage = by_name[name]
                state, reason, extra = await self._start_stage(
                    tx, fx, run, stage, by_stage[name], by_name
                )
                await move(stage, state, reason, **extra)
                changed = True

        ended = outcome([_view(s) for s in stages])
        if ended is not None:
            state, reason = ended
            await store.finish_run(tx, run_id, state, reason)
            fx.events.append(RunFinished(run_id=run_id, outcome=state, reason=reason))
            log.info("run_finished", run_id=run_id, outcome=state, reason=reason)

    @staticmethod
    async def _set_stage(
        tx: Connection, fx: _Effects, stage: StageRow, state: str, reason: str | None, **kw: Any
    ) -> None:
        """Store a stage's new state and say so on the bus: a waiting stage with the service it
        waits for and what that service needs, an ended one with what it produced."""
        await store.update_stage(tx, stage.run_id, stage.name, state=state, reason=reason, **kw)
        stage.state, stage.reason = state, reason
        for key in ("inputs", "outputs", "service"):
            if kw.get(key) is not None:
                setattr(stage, key, kw[key])
        fx.events.append(
            RunStageChanged(
                run_id=stage.run_id,
                stage=stage.name,
                stage_kind=stage.kind,
                state=state,
                service=stage.service if state == "waiting" else None,
                reason=reason,
                inputs=stage.inputs if state == "waiting" else {},
                outputs=stage.outputs if state in TERMINAL else {},
            )
        )

    async def _close_stage(
        self, tx: Connection, fx: _Effects, stage: StageRow, jobs: list[JobRow], why: str | None
    ) -> None:
        """A stage ended: what it has not started never will, and what still runs stops now
        (a sweep that ended frees its GPUs at once rather than finishing every trial)."""
        reason = f"stage {stage.name} ended" + (f": {why}" if why else "")
        for job in jobs:
            if job.state in ("pending", "queued"):
                await store.end_job(tx, job.id, state="cancelled", reason=reason)
                job.state, job.reason = "cancelled", reason
                fx.dequeued.append(job.id)
                fx.events.append(self._job_changed(job, "cancelled", reason))
            elif job.state in ("assigned", "running") and job.stop_requested_at is None:
                await self._stop(tx, fx, job, SCHEDULER, reason)

    async def _start_stage(
        self,
        tx: Connection,
        fx: _Effects,
        run: RunRow,
        stage: StageRow,
        jobs: list[JobRow],
        stages: Mapping[str, StageRow],
    ) -> tuple[str, str | None, dict[str, Any]]:
        """Start a ready stage: queue its jobs, or wait for the service that carries it out."""
        if stage.kind == "job":
            (job,) = jobs
            await self._queue(tx, fx, job)
            return ("failed", job.reason, {}) if job.state == "failed" else ("queued", None, {})
        if stage.kind == "training":
            limit = stage.inputs.get("max_concurrent_trials") or len(jobs)
            for job in sorted(jobs, key=lambda j: j.trial or 0)[:limit]:
                await self._queue(tx, fx, job)
            if all(j.state == "failed" for j in jobs[:limit]) and jobs:
                return "failed", jobs[0].reason, {}
            note = f"{len(jobs)} trials, at most {limit} at once"
            if stage.inputs.get("early_stopping"):
                # Said where people look rather than dropped silently.
                note += "; early_stopping is not applied yet: every trial runs to its end"
            return "queued", note, {}
        if stage.kind == "validation":
            (job,) = jobs
            best = self._best_of(stages)
            if best is None:
                await self._queue(tx, fx, job)
            else:
                work = dict(job.work)
                work["hparams"] = best["hparams"]
                work["init_checkpoint"] = f"{best['output_prefix']}checkpoints/"
                work["datasets"] = self._datasets(stages)
                job.work = work
                job.hparams = best["hparams"]
                await self._queue(tx, fx, job)
            return ("failed", job.reason, {}) if job.state == "failed" else ("queued", None, {})
        # data, packaging, deployment: another service's work
        inputs = dict(stage.inputs)
        inputs["run_id"] = run.id
        inputs["repository"] = run.repository
        inputs["commit"] = run.commit_sha
        if (best := self._best_of(stages)) is not None:
            inputs["model"] = best
        return "waiting", f"waiting for {stage.service}", {"inputs": inputs}

    @staticmethod
    def _best_of(stages: Mapping[str, StageRow]) -> dict[str, Any] | None:
        for stage in stages.values():
            if stage.kind == "training" and stage.state == "succeeded":
                return dict(stage.outputs)
        return None

    @staticmethod
    def _datasets(stages: Mapping[str, StageRow]) -> dict[str, str]:
        for stage in stages.values():
            if stage.kind == "data":
                return dict(stage.outputs.get("versions", {}))
        return {}

    async def _stage_progress(
        self,
        tx: Connection,
        fx: _Effects,
        run: RunRow,
        stage: StageRow,
        jobs: list[JobRow],
        stages: Mapping[str, StageRow],
    ) -> tuple[str, str | None, dict[str, Any]] | None:
        """A queued or running stage's new state from its jobs, or None if it has not moved."""
        if stage.kind == "training":
            return await self._sweep_progress(tx, fx, run, stage, jobs)
        (job,) = jobs
        if not job.ended:
            if stage.state == "queued" and job.state in ("assigned", "running"):
                return "running", None, {}
            return None
        if job.state != "succeeded":
            return (
                "failed",
                f"{job.name} {job.state}" + (f": {job.reason}" if job.reason else ""),
                {},
            )
        if stage.kind != "validation":
            return "succeeded", None, {}
        gates = list(stage.inputs.get("gates", []))
        metrics = job.metrics
        if any(needs_baseline(g) for g in gates):
            # History is the metrics collector's: it answers with BaselineResolved.
            named = sorted({n for g in gates for n in gate_metrics(g)})
            inputs = {
                **stage.inputs,
                "run_id": run.id,
                "job_id": job.id,
                "metrics": named,
                "repository": run.repository,
                "ref": run.ref,
                "pipeline": run.pipeline,
            }
            return (
                "waiting",
                f"waiting for {BASELINE_SERVICE}: the gates compare with a baseline",
                {"outputs": {"metrics": _finite(metrics)}, "inputs": inputs,
                 "service": BASELINE_SERVICE},
            )  # fmt: skip
        return self._gated(gates, metrics, None, None)

    @staticmethod
    def _gated(
        gates: Sequence[str],
        metrics: Mapping[str, Mapping[str, float]],
        baseline: Mapping[str, float] | None,
        no_baseline: str | None,
    ) -> tuple[str, str | None, dict[str, Any]]:
        """The stage's end from its gates: every detail in the reason, results in the outputs."""
        results = evaluate_gates(gates, metrics, baseline, no_baseline=no_baseline)
        outputs: dict[str, Any] = {
            "metrics": _finite(metrics),
            "gates": [{"gate": r.gate, "passed": r.passed, "detail": r.detail} for r in results],
        }
        if baseline is not None:
            outputs["baseline"] = _finite({k: {"value": v} for k, v in baseline.items()})
        failed = [r for r in results if not r.passed]
        if failed:
            return "failed", "; ".join(r.detail for r in failed), {"outputs": outputs}
        summary = "; ".join(r.detail for r in results) or "no gates"
        return "succeeded", summary, {"outputs": outputs}

    async def _sweep_progress(
        self, tx: Connection, fx: _Effects, run: RunRow, stage: StageRow, trials: list[JobRow]
    ) -> tuple[str, str | None, dict[str, Any]] | None:
        active = [t for t in trials if t.state in ("queued", "assigned", "running")]
        waiting = sorted((t for t in trials if t.state == "pending"), key=lambda t: t.trial or 0)
        limit = stage.inputs.get("max_concurrent_trials") or len(trials)
        for trial in waiting[: max(0, limit - len(active))]:
            await self._queue(tx, fx, trial)
        if not all(t.ended for t in trials):
            if stage.state == "queued" and any(
                t.state in ("assigned", "running") or t.ended for t in trials
            ):
                return "running", stage.reason, {}
            return None
        objective = Objective.model_validate(stage.inputs["objective"])
        done = [t for t in trials if t.state == "succeeded"]
        best = best_trial(objective, [(t.trial or 0, t.metrics) for t in done])
        what = f"{objective.metric} ({objective.mode}, {objective.scope})"
        if best is None and len(trials) == 1 and done:
            best = done[0].trial or 0  # nothing to choose between: the one trial goes on
        if best is None:
            if not done:
                first = min(trials, key=lambda t: t.trial or 0)
                why = f"{first.state}" + (f": {first.reason}" if first.reason else "")
                return "failed", f"no trial succeeded; trial {first.trial} {why}", {}
            return (
                "failed",
                f"no trial has a usable {what}: {len(done)} succeeded without a finite value, "
                f"{len(trials) - len(done)} did not succeed",
                {},
            )
        winner = next(t for t in done if t.trial == best)
        await store.set_best_trial(tx, run.id, best)
        value = objective_value(objective, winner.metrics)
        outputs = {
            "best_trial": best,
            "best_job": winner.id,
            "objective_spec": objective.model_dump(mode="json", exclude_none=True),
            "objective": value,
            "hparams": winner.hparams,
            "output_prefix": winner.work.get("output_prefix"),
            "artifacts": winner.artifacts,
        }
        if value is None:
            reason = f"the only trial succeeded ({objective.metric} not logged)"
        else:
            reason = (
                f"best trial {best} of {len(trials)}: {objective.metric}={value:.6g} "
                f"({objective.mode}, {objective.scope}); {len(done)} succeeded"
            )
        return "succeeded", reason, {"outputs": outputs}

    async def _queue(self, tx: Connection, fx: _Effects, job: JobRow) -> None:
        """Submit a job to placement, or reject it now if no registered agent could ever run it."""
        request = request_of(job)
        agents = self.cluster.agents.values()
        if agents and (why := feasible(request, agents)):
            rejected = f"no registered agent could ever run it: {why}"
            await store.end_job(tx, job.id, state="failed", reason=rejected)
            job.state, job.reason = "failed", rejected
            fx.events.append(self._job_changed(job, "failed", rejected))
            log.warning("job_rejected", job_id=job.id, reason=rejected)
            return
        estimate = await store.learned_runtime(tx, job.project, job.name) or job.timeout_s
        reason = None if agents else "no agents registered yet"
        await store.queue_job(
            tx,
            job.id,
            work=job.work,
            hparams=job.hparams,
            runtime_estimate_s=estimate,
            reason=reason,
        )
        job.state, job.runtime_estimate_s = "queued", estimate
        job.queued_at = datetime.now(UTC)
        fx.queued.append(request_of(job))
        fx.events.append(self._job_changed(job, "queued", reason))

    @staticmethod
    def _job_changed(
        job: JobRow, state: str, reason: str | None, agents: Sequence[str] = ()
    ) -> JobChanged:
        return JobChanged(
            run_id=job.run_id,
            job_id=job.id,
            stage=job.stage,
            state=state,
            attempt=job.attempt,
            agents=list(agents),
            reason=reason,
        )

    # -- events from agents and other services ---------------------------------------------------

    async def on_job_accepted(self, event: JobAccepted) -> None:
        await self._node_progress(
            event.job_id, event.attempt, event.node_rank, event.agent_id, "accepted"
        )

    async def on_job_started(self, event: JobStarted) -> None:
        await self._node_progress(
            event.job_id, event.attempt, event.node_rank, event.agent_id, "running"
        )

    async def _node_progress(
        self, job_id: str, attempt: int, rank: int, agent: str, state: str
    ) -> None:
        async with self._mutex, self._change() as (tx, fx):
            job = await store.get_job(tx, job_id, lock=True)
            if job is None:
                log.warning("unknown_job", job_id=job_id, agent_id=agent)
                return
            if job.attempt != attempt or job.state not in ("assigned", "running"):
                # A withdrawn assignment the agent took late: make sure it does not run.
                fx.events.append(
                    JobStop(
                        job_id=job_id,
                        attempt=attempt,
                        requested_by=SCHEDULER,
                        reason=f"attempt {attempt} was withdrawn "
                        f"(the job is {job.state}, at attempt {job.attempt})",
                    )
                )
                return
            if not await store.mark_node(tx, job_id, attempt, rank, state=state):
                return
            nodes = await store.nodes_of(tx, job_id, attempt)
            if job.state == "assigned" and all(n.state != "assigned" for n in nodes):
                await store.set_job_running(tx, job_id)
                fx.events.append(
                    self._job_changed(job, "running", None, [n.agent_id for n in nodes])
                )
                await self._advance(tx, fx, job.run_id)

    async def on_job_finished(self, event: JobFinished) -> None:
        async with self._mutex, self._change() as (tx, fx):
            job = await store.get_job(tx, event.job_id, lock=True)
            if (
                job is None
                or job.attempt != event.attempt
                or job.state not in ("assigned", "running")
            ):
                log.info(
                    "stale_job_report",
                    job_id=event.job_id,
                    attempt=event.attempt,
                    outcome=event.outcome,
                )
                return
            first = await store.mark_node(
                tx,
                job.id,
                event.attempt,
                event.node_rank,
                state=event.outcome,
                exit_code=event.exit_code,
                reason=event.reason,
            )
            if not first:
                return
            if event.node_rank == 0:
                await store.save_job_result(
                    tx,
                    job.id,
                    metrics=event.metrics,
                    artifacts=event.artifacts,
                    exit_code=event.exit_code,
                )
                job.metrics, job.artifacts, job.exit_code = (
                    event.metrics,
                    event.artifacts,
                    event.exit_code,
                )
            if event.stopped_by and not job.stop_requested_by:
                job.stop_requested_by = event.stopped_by
            nodes = await store.nodes_of(tx, job.id, job.attempt)
            await self._node_ended(tx, fx, job, nodes, event.outcome, event.node_rank)

    async def _node_ended(
        self,
        tx: Connection,
        fx: _Effects,
        job: JobRow,
        nodes: list[NodeRow],
        outcome_: str,
        rank: int,
    ) -> None:
        """A node ended: stop its siblings if it failed, end the attempt when all have."""
        unfinished = [n for n in nodes if n.finished_at is None]
        if unfinished:
            if outcome_ != "succeeded" and job.stop_requested_at is None:
                node = nodes[rank]
                why = f"node {rank} on {node.agent_id} {outcome_}"
                await self._stop(tx, fx, job, SCHEDULER, why)
            return
        await self._end_attempt(tx, fx, job, nodes)

    async def _stop(self, tx: Connection, fx: _Effects, job: JobRow, by: str, reason: str) -> None:
        await store.request_stop(tx, job.id, by, reason)
        if job.stop_requested_at is None:
            job.stop_requested_by, job.stop_reason = by, reason
            job.stop_requested_at = datetime.now(UTC)
        fx.events.append(
            JobStop(job_id=job.id, attempt=job.attempt, requested_by=by, reason=reason)
        )

    async def _end_attempt(
        self, tx: Connection, fx: _Effects, job: JobRow, nodes: list[NodeRow]
    ) -> None:
        """Every node of the attempt ended: the job succeeded, goes back to the queue, or ended."""
        fx.released.append(job.id)
        states = [n.state for n in nodes]
        bad = next((n for n in nodes if n.state != "succeeded"), None)
        run = await store.get_run(tx, job.run_id)
        cancelled = run is not None and (
            run.state == "cancelled" or run.cancel_requested_by is not None
        )
        if bad is None:
            final, reason = "succeeded", None
        elif cancelled:
            final, reason = "cancelled", job.stop_reason or "run cancelled"
        elif job.stop_requested_by and job.stop_requested_by != SCHEDULER:
            final, reason = (
                "stopped",
                f"stopped by {job.stop_requested_by}: {job.stop_reason or bad.reason or ''}".rstrip(
                    ": "
                ),
            )
        elif "timed_out" in states or (
            job.stop_requested_by == SCHEDULER and "timed out" in (job.stop_reason or "")
        ):
            final, reason = "timed_out", job.stop_reason or bad.reason or "timed out"
        elif "lost" in states:
            final, reason = "lost", next(n.reason for n in nodes if n.state == "lost")
        elif "failed" in states or not (job.stop_requested_by == SCHEDULER and job.stop_reason):
            # A node that failed makes the attempt failed (and retried), even though the
            # scheduler then stopped its other nodes.
            bad = next((n for n in nodes if n.state == "failed"), bad)
            final = "failed" if bad.state == "failed" else bad.state
            code = f" (exit {bad.exit_code})" if bad.exit_code is not None else ""
            reason = f"node {bad.rank} on {bad.agent_id}{code}" + (
                f": {bad.reason}" if bad.reason else ""
            )
        else:
            final, reason = "stopped", job.stop_reason
        lost_agents = [n.agent_id for n in nodes if n.state == "lost"]
        if (
            final in ("failed", "lost")
            and job.failures + 1 <= job.max_retries
            and run
            and run.state == "running"
        ):
            work = dict(job.work)
            work["init_checkpoint"] = f"{work.get('output_prefix', '')}checkpoints/"
            retry = f"retry {job.failures + 1} of {job.max_retries} after {final}: {reason}"
            await store.requeue_job(tx, job.id, reason=retry, exclude=lost_agents, failed=True)
            await tx.execute("UPDATE jobs SET work = $2 WHERE id = $1", job.id, work)
            job.excluded_agents = sorted({*job.excluded_agents, *lost_agents})
            job.work = work
            fx.queued.append(request_of(job))
            fx.events.append(self._job_changed(job, "queued", retry))
            log.info("job_retried", job_id=job.id, attempt=job.attempt, reason=reason)
            return
        objective = None
        if job.kind == "trial" and final == "succeeded":
            stage = await tx.fetchrow(
                "SELECT inputs FROM stages WHERE run_id = $1 AND name = $2", job.run_id, job.stage
            )
            if stage is not None and "objective" in stage["inputs"]:
                objective = objective_value(
                    Objective.model_validate(stage["inputs"]["objective"]), job.metrics
                )
        await store.end_job(
            tx,
            job.id,
            state=final,
            reason=reason,
            exit_code=job.exit_code
            if job.exit_code is not None
            else (bad.exit_code if bad else None),
            metrics=job.metrics or None,
            objective=objective,
            artifacts=job.artifacts or None,
            stopped_by=job.stop_requested_by if final in ("stopped", "cancelled") else None,
        )
        fx.events.append(self._job_changed(job, final, reason, [n.agent_id for n in nodes]))
        log.info("job_ended", job_id=job.id, outcome=final, reason=reason)
        await self._advance(tx, fx, job.run_id)

    async def on_agent_registered(self, event: AgentRegistered) -> None:
        self.monitor.heard(event.agent_id, event.inventory, event.running_jobs)
        async with self._mutex, self._change() as (tx, fx):
            await store.upsert_agent(
                tx,
                event.agent_id,
                event.hostname,
                event.simulated,
                event.inventory.model_dump(mode="json"),
            )
            # Jobs it had accepted but no longer runs: it restarted without them.
            running = set(event.running_jobs)
            for node in await store.unfinished_nodes_on(tx, event.agent_id):
                if node.state in ("accepted", "running") and node.job_id not in running:
                    await self._lose_node(
                        tx, fx, node, f"agent {event.agent_id} restarted without it"
                    )
        if self.active:
            async with self._mutex:
                self._register(self.cluster, event.agent_id, event.inventory)
        log.info(
            "agent_registered",
            agent_id=event.agent_id,
            gpus=len(event.inventory.gpus),
            simulated=event.simulated,
        )
        self.wake()

    def on_heartbeat(self, event: AgentHeartbeat) -> None:
        """Every replica: remember the report; the active one refreshes placement next tick."""
        if self.monitor.heard(event.agent_id, event.inventory, event.running_jobs) or (
            self.active and event.agent_id not in self.cluster.agents
        ):
            self._refresh.add(event.agent_id)
            self.wake()

    async def _lose_node(self, tx: Connection, fx: _Effects, node: NodeRow, reason: str) -> None:
        """A node's agent is gone: the attempt ends now (its other nodes are told to stop), so
        its GPUs elsewhere and the job itself are free to go on at once."""
        job = await store.get_job(tx, node.job_id, lock=True)
        if job is None or job.attempt != node.attempt or job.state not in ("assigned", "running"):
            return
        await store.mark_node(tx, job.id, node.attempt, node.rank, state="lost", reason=reason)
        others = [n for n in await store.nodes_of(tx, job.id, job.attempt) if n.finished_at is None]
        why = f"node {node.rank} lost: {reason}"
        for other in others:
            await store.mark_node(tx, job.id, job.attempt, other.rank, state="stopped", reason=why)
        # Every node is told, the lost one included: an agent only cut off from the bus gets the
        # stop from its durable consumer when it is back, and does not run on beside the retry.
        fx.events.append(
            JobStop(job_id=job.id, attempt=job.attempt, requested_by=SCHEDULER, reason=why)
        )
        await self._end_attempt(tx, fx, job, await store.nodes_of(tx, job.id, job.attempt))

    async def on_data_version_ready(self, event: DataVersionReady) -> None:
        if event.run_id is None:
            return
        async with self._mutex, self._change() as (tx, fx):
            run = await store.lock_run(tx, event.run_id)
            if run is None or run.state != "running":
                return
            for stage in (await store.stages_of(tx, [run.id]))[run.id]:
                if stage.kind != "data" or stage.state != "waiting":
                    continue
                versions = {**stage.outputs.get("versions", {}), event.dataset: event.version_id}
                wanted = set(stage.inputs.get("datasets", {}))
                missing = sorted(wanted - set(versions))
                state = "waiting" if missing else "succeeded"
                reason = f"waiting for data_versioner: {', '.join(missing)}" if missing else None
                await self._set_stage(tx, fx, stage, state, reason, outputs={"versions": versions})
            await self._advance(tx, fx, run.id)

    async def on_baseline_resolved(self, event: BaselineResolved) -> None:
        """The metrics collector found the baseline a waiting validation stage's gates need."""
        async with self._mutex, self._change() as (tx, fx):
            run = await store.lock_run(tx, event.run_id)
            if run is None or run.state != "running":
                return
            stage = next(
                (s for s in (await store.stages_of(tx, [run.id]))[run.id] if s.name == event.stage),
                None,
            )
            if stage is None or stage.state != "waiting" or stage.service != BASELINE_SERVICE:
                return
            metrics = store.decode_metrics(stage.outputs.get("metrics", {}))
            gates = list(stage.inputs.get("gates", []))
            no_baseline = None if event.baseline_run_id else event.reason
            state, reason, extra = self._gated(gates, metrics, event.baseline, no_baseline)
            if event.baseline_run_id:
                extra["outputs"]["baseline_run_id"] = event.baseline_run_id
            await self._set_stage(tx, fx, stage, state, reason, **extra)
            await self._advance(tx, fx, run.id)

    async def on_model_registered(self, event: ModelRegistered) -> None:
        if event.run_id is None:
            return
        async with self._mutex, self._change() as (tx, fx):
            run = await store.lock_run(tx, event.run_id)
            if run is None or run.state != "running":
                return
            for stage in (await store.stages_of(tx, [run.id]))[run.id]:
                if stage.kind == "packaging" and stage.state == "waiting":
                    reason = (
                        f"registered {event.model} {event.version} ({', '.join(event.formats)})"
                    )
                    outputs = {
                        "model": event.model,
                        "version": event.version,
                        "location": event.location,
                    }
                    await self._set_stage(tx, fx, stage, "succeeded", reason, outputs=outputs)
            await self._advance(tx, fx, run.id)

    # -- the periodic work -------------------------------------------------------------------------

    async def run(self) -> None:
        """Tick while this replica is active: on every wake-up, at least every tick_interval."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.timing.tick_interval)
            self._wake.clear()
            if not self.active:
                continue
            try:
                await self.tick()
            except Deposed as exc:
                log.warning("tick_deposed", error=str(exc))
            except Exception as exc:  # one bad tick must not end scheduling
                log.exception("tick_failed", error=repr(exc))
                await asyncio.sleep(self.timing.tick_interval)

    async def tick(self) -> None:
        async with self._mutex:
            for step in (
                self._refresh_agents,
                self._cancel_requested,
                self._lost_agents,
                self._unacknowledged,
                self._deadlines,
                self._place,
                self._flush_heartbeats,
            ):
                if not self.active:
                    return
                try:
                    await step()
                except Deposed:
                    raise
                except Exception as exc:  # one failing step must not stop the others
                    log.exception("tick_step_failed", step=step.__name__, error=repr(exc))

    async def _refresh_agents(self) -> None:
        while self._refresh:
            agent_id = self._refresh.pop()
            inventory = self.monitor.inventories.get(agent_id)
            if inventory is None:
                continue
            if agent_id not in self.cluster.agents:
                # Heard but not registered here: new to us, or back after being lost.
                async with self._change() as (tx, _):
                    await store.upsert_agent(
                        tx,
                        agent_id,
                        inventory.hostname or agent_id,
                        inventory.simulated,
                        inventory.model_dump(mode="json"),
                    )
                log.info("agent_back", agent_id=agent_id)
            self._register(self.cluster, agent_id, inventory)

    async def _cancel_requested(self) -> None:
        async with self.db.connection() as conn:
            run_ids = await store.runs_to_cancel(conn)
            stops = await store.queued_stop_requests(conn)
        for run_id in run_ids:
            async with self._change() as (tx, fx):
                await self._cancel(tx, fx, run_id)
        for job in stops:
            async with self._change() as (tx, fx):
                locked = await store.get_job(tx, job.id, lock=True)
                if locked is None or locked.state != "queued":
                    continue
                reason = (
                    f"stopped by {locked.stop_requested_by} before it started: {locked.stop_reason}"
                )
                await store.end_job(
                    tx, job.id, state="stopped", reason=reason, stopped_by=locked.stop_requested_by
                )
                fx.dequeued.append(job.id)
                fx.events.append(self._job_changed(locked, "stopped", reason))
                await self._advance(tx, fx, job.run_id)

    async def _cancel(self, tx: Connection, fx: _Effects, run_id: str) -> None:
        run = await store.lock_run(tx, run_id)
        if run is None or run.state != "running":
            return
        by = run.cancel_requested_by or "someone"
        reason = f"cancelled by {by}" + (f": {run.cancel_reason}" if run.cancel_reason else "")
        for job_id in await store.cancel_pending_jobs(tx, run_id, reason):
            fx.dequeued.append(job_id)
        for job in await store.jobs_of_run(tx, run_id):
            if job.state in ("assigned", "running"):
                await self._stop(tx, fx, job, by, reason)
            elif job.state == "cancelled" and job.id in fx.dequeued:
                fx.events.append(self._job_changed(job, "cancelled", reason))
        for stage in (await store.stages_of(tx, [run_id]))[run_id]:
            if stage.state not in TERMINAL:
                await self._set_stage(tx, fx, stage, "cancelled", reason)
        await store.finish_run(tx, run_id, "cancelled", reason)
        fx.events.append(RunFinished(run_id=run_id, outcome="cancelled", reason=reason))
        log.info("run_cancelled", run_id=run_id, by=by)

    async def _lost_agents(self) -> None:
        for agent_id in list(self.cluster.agents):
            silent = self.monitor.silent_for(agent_id)
            if silent <= self.timing.agent_lost_after:
                continue
            async with self._change() as (tx, fx):
                await store.mark_agent_lost(tx, agent_id)
                nodes = await store.unfinished_nodes_on(tx, agent_id)
                why = f"agent {agent_id} lost: silent for {silent:.0f}s"
                for node in nodes:
                    await self._lose_node(tx, fx, node, why)
                fx.events.append(
                    AgentLost(
                        agent_id=agent_id,
                        silent_for_s=round(silent, 1),
                        jobs=sorted({n.job_id for n in nodes}),
                    )
                )
            # Every attempt with a node there has ended; anything still allocated there is a
            # leftover the database no longer knows: free it, and forget the agent.
            for job_id in self.cluster.jobs_on(agent_id):
                self.cluster.finish(job_id, time.time())
            self.cluster.remove_agent(agent_id)
            self.monitor.forget(agent_id)
            log.warning("agent_lost", agent_id=agent_id, silent_s=round(silent, 1), jobs=len(nodes))

    async def _unacknowledged(self) -> None:
        async with self.db.connection() as conn:
            late = await store.unacknowledged(conn, self.timing.ack_timeout)
        for stale in late:
            async with self._change() as (tx, fx):
                job = await store.get_job(tx, stale.id, lock=True)
                if job is None or job.state != "assigned" or job.attempt != stale.attempt:
                    continue
                nodes = await store.nodes_of(tx, job.id, job.attempt)
                silent = [n.agent_id for n in nodes if n.state == "assigned"]
                if not silent:
                    # Every node answered (a report overtook its acceptance): it runs.
                    await store.set_job_running(tx, job.id)
                    fx.events.append(self._job_changed(job, "running", None))
                    continue
                if job.stop_requested_by and job.stop_requested_by != SCHEDULER:
                    # Asked to stop while its agents were silent: it ends here, not elsewhere.
                    reason = f"stopped by {job.stop_requested_by}: {job.stop_reason}"
                    fx.events.append(
                        JobStop(job_id=job.id, attempt=job.attempt, requested_by=SCHEDULER,
                                reason=reason)
                    )  # fmt: skip
                    fx.released.append(job.id)
                    await store.end_job(tx, job.id, state="stopped", reason=reason,
                                        stopped_by=job.stop_requested_by)  # fmt: skip
                    fx.events.append(self._job_changed(job, "stopped", reason))
                    await self._advance(tx, fx, job.run_id)
                    continue
                why = f"not accepted by {', '.join(silent)} within {self.timing.ack_timeout:g}s"
                for node in nodes:
                    if node.finished_at is None:
                        await store.mark_node(
                            tx, job.id, job.attempt, node.rank, state="lost", reason=why
                        )
                fx.events.append(
                    JobStop(job_id=job.id, attempt=job.attempt, requested_by=SCHEDULER, reason=why)
                )
                fx.released.append(job.id)
                await store.requeue_job(
                    tx, job.id, reason=f"placed again: {why}", exclude=silent, failed=False
                )
                job.excluded_agents = sorted({*job.excluded_agents, *silent})
                job.state = "queued"
                request = request_of(job)
                agents = list(self.cluster.agents.values())
                if (problem := feasible(request, agents)) is not None:
                    reason = f"{why}, and no other agent could run it: {problem}"
                    await store.end_job(tx, job.id, state="failed", reason=reason)
                    fx.events.append(self._job_changed(job, "failed", reason))
                    await self._advance(tx, fx, job.run_id)
                else:
                    fx.queued.append(request)
                    fx.events.append(self._job_changed(job, "queued", f"placed again: {why}"))
                log.warning("assignment_unacknowledged", job_id=job.id, agents=silent)

    async def _deadlines(self) -> None:
        slack = self.timing.ack_timeout
        async with self.db.connection() as conn:
            overrun = await store.overrunning(conn, slack)
            unconfirmed = await store.unconfirmed_stops(conn, self.timing.stop_grace + slack)
            stages = await store.overdue_stages(conn)
        for late in overrun:
            async with self._change() as (tx, fx):
                await self._stop(tx, fx, late, SCHEDULER, f"timed out after {late.timeout_s:g}s")
        for stale in unconfirmed:
            async with self._change() as (tx, fx):
                job = await store.get_job(tx, stale.id, lock=True)
                if job is None or job.state not in ("assigned", "running"):
                    continue
                nodes = await store.nodes_of(tx, job.id, job.attempt)
                timed_out = (job.stop_reason or "").startswith("timed out")
                waited = self.timing.stop_grace + slack
                why = f"{job.stop_reason}; its agent did not confirm the stop within {waited:g}s"
                for node in nodes:
                    if node.finished_at is None:
                        await store.mark_node(
                            tx,
                            job.id,
                            job.attempt,
                            node.rank,
                            state="timed_out" if timed_out else "stopped",
                            reason=why,
                        )
                await self._end_attempt(tx, fx, job, await store.nodes_of(tx, job.id, job.attempt))
        for stage in stages:
            async with self._change() as (tx, fx):
                run = await store.lock_run(tx, stage.run_id)
                if run is None or run.state != "running":
                    continue
                why = f"timed out after {stage.timeout_s:g}s"
                for job in await store.jobs_of_run(tx, stage.run_id):
                    if job.stage != stage.name:
                        continue
                    if job.state in ("assigned", "running"):
                        await self._stop(tx, fx, job, SCHEDULER, f"stage {stage.name} {why}")
                    elif job.state in ("pending", "queued"):
                        await store.end_job(
                            tx, job.id, state="cancelled", reason=f"stage {stage.name} {why}"
                        )
                        fx.dequeued.append(job.id)
                await self._set_stage(tx, fx, stage, "failed", why)
                await self._advance(tx, fx, stage.run_id)

    async def _place(self) -> None:
        if not len(self.queue) or not self.cluster.agents:
            return
        now = time.time()
        decisions = schedule(self.cluster, self.queue, now)
        await self._note_stalled({s.job_id: f"stalled: {s.reason}" for s in decisions.stalled})
        if not decisions.placements:
            return
        placed: list[Placement] = []
        async with self._change() as (tx, fx):
            for placement in decisions.placements:
                nodes = [(rank, n.agent_id, n.gpus) for rank, n in enumerate(placement.nodes)]
                job = await store.assign_job(tx, placement.job_id, nodes)
                if job is None:
                    fx.dequeued.append(placement.job_id)
                    continue
                placed.append(placement)
                fx.events.extend(self._assignments(job, placement))
                fx.events.append(
                    self._job_changed(job, "assigned", None, [n.agent_id for n in placement.nodes])
                )
                row = await tx.fetchrow(
                    "UPDATE stages SET state = 'running' WHERE run_id = $1 AND name = $2"
                    " AND state = 'queued' RETURNING kind, reason",
                    job.run_id,
                    job.stage,
                )
                if row is not None:
                    fx.events.append(
                        RunStageChanged(
                            run_id=job.run_id,
                            stage=job.stage,
                            stage_kind=row["kind"],
                            state="running",
                            reason=row["reason"],
                        )
                    )
        self.cluster.start(placed, now)
        for placement in placed:
            self.queue.remove(placement.job_id)
            self._stalled.pop(placement.job_id, None)
        log.info("jobs_placed", count=len(placed), queued=len(self.queue))

    def _assignments(self, job: JobRow, placement: Placement) -> list[JobAssigned]:
        rendezvous = None
        if job.nodes > 1:
            first = placement.nodes[0].agent_id
            host = self.monitor.inventories.get(first, Inventory()).address
            base, span = RENDEZVOUS_PORTS
            port = base + (zlib.crc32(f"{job.id}/{job.attempt}".encode()) % span)
            rendezvous = f"{host}:{port}"
        work = JobWork.model_validate({**job.work, "rendezvous": rendezvous})
        return [
            JobAssigned(
                agent_id=node.agent_id,
                run_id=job.run_id,
                job_id=job.id,
                attempt=job.attempt,
                node_rank=rank,
                gpus=list(node.gpus),
                work=work,
            )
            for rank, node in enumerate(placement.nodes)
        ]

    async def _note_stalled(self, reasons: Mapping[str, str]) -> None:
        changed = {k: v for k, v in reasons.items() if self._stalled.get(k) != v}
        if not changed:
            return
        async with self._change() as (tx, _):
            for job_id, reason in changed.items():
                await tx.execute(
                    "UPDATE jobs SET reason = $2 WHERE id = $1 AND state = 'queued'", job_id, reason
                )
        self._stalled.update(changed)

    async def _flush_heartbeats(self) -> None:
        if time.monotonic() - self._flushed < self.timing.heartbeat_flush:
            return
        self._flushed = time.monotonic()
        seen = [
            (agent_id, at, self.monitor.inventories[agent_id].model_dump(mode="json"))
            for agent_id, at in self.monitor.seen_at.items()
            if agent_id in self.monitor.inventories
        ]
        if seen:
            async with self.db.connection() as conn:
                await store.touch_agents(conn, seen)


def _view(stage: StageRow) -> StageView:
    return StageView(stage.name, stage.state, tuple(stage.needs), stage.reason)


def _finite(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    return store.encode_metrics(metrics)
