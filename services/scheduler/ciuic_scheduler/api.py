"""The gRPC API of the scheduler (`ciuic.v1.SchedulerService`): runs, jobs, trials, agents.

Every replica serves reads from PostgreSQL (and its own view of agents' heartbeats). A cancel or a
stop is recorded here, in a transaction, and the active replica carries it out (woken by NOTIFY).
Domain errors become gRPC status codes in the shared interceptor.
"""

from __future__ import annotations

import base64
import json
import math
from datetime import datetime
from typing import Any

from ciuic_common.db import Connection, Database
from ciuic_common.errors import FailedPrecondition, InvalidArgument, NotFound
from ciuic_common.events import Inventory, JobStop
from ciuic_common.outbox import Outbox
from ciuic_common.proto import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from ciuic_common.rpc import timestamp
from ciuic_scheduler import store
from ciuic_scheduler.engine import AgentMonitor
from ciuic_scheduler.store import JobRow, NodeRow, RunRow, StageRow

DEFAULT_PAGE = 50
MAX_PAGE = 500
#: PostgreSQL channel the active replica listens on for changes made by any replica.
WAKE_CHANNEL = "ciuic_scheduler"


def stage_message(stage: StageRow) -> scheduler_pb2.Stage:
    return scheduler_pb2.Stage(
        name=stage.name,
        kind=stage.kind,
        state=stage.state,
        service=(stage.service or "") if stage.state == "waiting" else "",
        reason=stage.reason or "",
        needs=stage.needs,
        started_at=timestamp(stage.started_at),
        finished_at=timestamp(stage.finished_at),
        timeout_seconds=stage.timeout_s or 0.0,
    )


def job_message(job: JobRow, nodes: list[NodeRow]) -> scheduler_pb2.Job:
    return scheduler_pb2.Job(
        id=job.id,
        run_id=job.run_id,
        stage=job.stage,
        kind=job.kind,
        name=job.name,
        state=job.state,
        reason=job.reason or "",
        attempt=job.attempt,
        max_retries=job.max_retries,
        nodes=job.nodes,
        gpus_per_node=job.gpus_per_node,
        trial=job.trial if job.trial is not None else -1,
        placement=[
            scheduler_pb2.JobNode(rank=n.rank, agent_id=n.agent_id, gpus=n.gpus, state=n.state)
            for n in nodes
        ],
        excluded_agents=job.excluded_agents,
        queued_at=timestamp(job.queued_at),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
        exit_code=job.exit_code or 0,
        has_exit_code=job.exit_code is not None,
        metrics_json=json.dumps(job.metrics, allow_nan=True),
        stopped_by=job.stopped_by or job.stop_requested_by or "",
        artifacts=job.artifacts,
    )


def run_message(
    run: RunRow, stages: list[StageRow], jobs: list[scheduler_pb2.Job] | None = None
) -> scheduler_pb2.Run:
    return scheduler_pb2.Run(
        id=run.id,
        repository=run.repository,
        commit=run.commit_sha,
        ref=run.ref,
        pipeline=run.pipeline or "",
        state=run.state,
        reason=run.reason or "",
        created_at=timestamp(run.created_at),
        finished_at=timestamp(run.finished_at),
        stages=[stage_message(s) for s in stages],
        jobs=jobs or [],
        best_trial=run.best_trial if run.best_trial is not None else -1,
        pusher=run.pusher or "",
    )


def _cursor(token: str) -> tuple[datetime, str] | None:
    if not token:
        return None
    try:
        when, run_id = base64.urlsafe_b64decode(token).decode().split("|", 1)
        return datetime.fromisoformat(when), run_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument("page_token is not one this server gave out") from exc


def _token(run: RunRow) -> str:
    return base64.urlsafe_b64encode(f"{run.created_at.isoformat()}|{run.id}".encode()).decode()


async def _run_id(conn: Connection, given: str) -> str:
    if not given:
        raise InvalidArgument("run_id is required")
    found = await store.resolve_run_id(conn, given)
    if not found:
        raise NotFound(f"no run has an id starting {given!r}")
    if len(found) > 1 and given not in found:
        raise InvalidArgument(f"{given!r} names several runs; give more of the id")
    return given if given in found else found[0]


async def _job_id(conn: Connection, given: str) -> str:
    if not given:
        raise InvalidArgument("job_id is required")
    found = await store.resolve_job_id(conn, given)
    if not found:
        raise NotFound(f"no job has an id starting {given!r}")
    if len(found) > 1 and given not in found:
        raise InvalidArgument(f"{given!r} names several jobs; give more of the id")
    return given if given in found else found[0]


class SchedulerApi(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Thin: validate the request, read or record in the store, map to messages."""

    def __init__(self, db: Database, outbox: Outbox, monitor: AgentMonitor) -> None:
        self.db = db
        self.outbox = outbox
        self.monitor = monitor

    async def ListRuns(
        self, request: scheduler_pb2.ListRunsRequest, context: Any
    ) -> scheduler_pb2.ListRunsResponse:
        limit = min(request.page.page_size or DEFAULT_PAGE, MAX_PAGE)
        if limit < 0:
            raise InvalidArgument("page_size cannot be negative")
        async with self.db.connection() as conn:
            runs = await store.list_runs(
                conn,
                limit=limit + 1,
                before=_cursor(request.page.page_token),
                repository=request.repository or None,
                state=request.state or None,
            )
            page = runs[:limit]
            stages = await store.stages_of(conn, [r.id for r in page])
        token = _token(page[-1]) if len(runs) > limit and page else ""
        return scheduler_pb2.ListRunsResponse(
            runs=[run_message(r, stages[r.id]) for r in page],
            page=common_pb2.PageResponse(next_page_token=token),
        )

    async def GetRun(self, request: scheduler_pb2.GetRunRequest, context: Any) -> scheduler_pb2.Run:
        async with self.db.connection() as conn:
            return await self._run(conn, await _run_id(conn, request.run_id))

    async def _run(self, conn: Connection, run_id: str) -> scheduler_pb2.Run:
        run = await store.get_run(conn, run_id)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        stages = (await store.stages_of(conn, [run_id]))[run_id]
        jobs = await store.jobs_of_run(conn, run_id)
        nodes = await store.nodes_of_jobs(conn, [j.id for j in jobs])
        return run_message(run, stages, [job_message(j, nodes[j.id]) for j in jobs])

    async def CancelRun(
        self, request: scheduler_pb2.CancelRunRequest, context: Any
    ) -> scheduler_pb2.Run:
        by = request.requested_by or "unknown"
        async with self.db.transaction() as tx:
            run_id = await _run_id(tx, request.run_id)
            run = await store.lock_run(tx, run_id)
            assert run is not None
            if run.state != "running":
                raise FailedPrecondition(f"run {run_id} already {run.state}")
            await store.request_cancel(tx, run_id, by, request.reason)
            await tx.execute(f"NOTIFY {WAKE_CHANNEL}")
        async with self.db.connection() as conn:
            return await self._run(conn, run_id)

    async def ListJobs(
        self, request: scheduler_pb2.ListJobsRequest, context: Any
    ) -> scheduler_pb2.ListJobsResponse:
        limit = min(request.page.page_size or DEFAULT_PAGE, MAX_PAGE)
        if limit < 0:
            raise InvalidArgument("page_size cannot be negative")
        async with self.db.connection() as conn:
            run_id = await _run_id(conn, request.run_id) if request.run_id else None
            jobs = await store.list_jobs(
                conn,
                limit=limit + 1,
                after=request.page.page_token or None,
                run_id=run_id,
                state=request.state or None,
                agent_id=request.agent_id or None,
            )
            page = jobs[:limit]
            nodes = await store.nodes_of_jobs(conn, [j.id for j in page])
        token = page[-1].id if len(jobs) > limit and page else ""
        return scheduler_pb2.ListJobsResponse(
            jobs=[job_message(j, nodes[j.id]) for j in page],
            page=common_pb2.PageResponse(next_page_token=token),
        )

    async def GetJob(self, request: scheduler_pb2.GetJobRequest, context: Any) -> scheduler_pb2.Job:
        async with self.db.connection() as conn:
            return await self._job(conn, await _job_id(conn, request.job_id))

    async def _job(self, conn: Connection, job_id: str) -> scheduler_pb2.Job:
        job = await store.get_job(conn, job_id)
        if job is None:
            raise NotFound(f"job {job_id} does not exist")
        nodes = await store.nodes_of_jobs(conn, [job_id])
        return job_message(job, nodes[job_id])

    async def StopJob(
        self, request: scheduler_pb2.StopJobRequest, context: Any
    ) -> scheduler_pb2.Job:
        by = request.requested_by or "unknown"
        reason = request.reason or "asked to stop"
        async with self.db.transaction() as tx:
            job_id = await _job_id(tx, request.job_id)
            job = await store.get_job(tx, job_id, lock=True)
            assert job is not None
            if job.state not in ("queued", "assigned", "running"):
                raise FailedPrecondition(f"job {job_id} is {job.state}: there is nothing to stop")
            await store.request_stop(tx, job_id, by, reason)
            if job.state != "queued":
                await self.outbox.add(
                    tx, JobStop(job_id=job_id, attempt=job.attempt, requested_by=by, reason=reason)
                )
            await tx.execute(f"NOTIFY {WAKE_CHANNEL}")
        async with self.db.connection() as conn:
            return await self._job(conn, job_id)

    async def ListTrials(
        self, request: scheduler_pb2.ListTrialsRequest, context: Any
    ) -> scheduler_pb2.ListTrialsResponse:
        async with self.db.connection() as conn:
            run_id = await _run_id(conn, request.run_id)
            run = await store.get_run(conn, run_id)
            assert run is not None
            stages = (await store.stages_of(conn, [run_id]))[run_id]
            jobs = [j for j in await store.jobs_of_run(conn, run_id) if j.kind == "trial"]
        training = next((s for s in stages if s.kind == "training"), None)
        if training is None:
            raise FailedPrecondition(f"run {run_id} has no training stage")
        objective = training.inputs.get("objective", {})
        described = (
            f"{objective.get('metric')} ({objective.get('mode')}, "
            f"{objective.get('scope', 'last')}"
            + (f", k={objective['k']}" if objective.get("k") else "")
            + ")"
        )
        best = run.best_trial if run.best_trial is not None else -1
        # In the order the pipeline file declares them (jsonb does not keep key order).
        names = [p["name"] for p in (run.spec.get("training") or {}).get("hyperparameters", [])]

        def ordered(hparams: dict[str, Any]) -> str:
            keys = [n for n in names if n in hparams] + [k for k in hparams if k not in names]
            return json.dumps({k: hparams[k] for k in keys})

        return scheduler_pb2.ListTrialsResponse(
            trials=[
                scheduler_pb2.Trial(
                    index=j.trial or 0,
                    job_id=j.id,
                    hparams_json=ordered(j.hparams),
                    state=j.state,
                    objective=j.objective if j.objective is not None else math.nan,
                    has_objective=j.objective is not None,
                    best=j.trial == best,
                    reason=j.reason or "",
                )
                for j in sorted(jobs, key=lambda j: j.trial or 0)
            ],
            objective=described,
            best_trial=best,
        )

    async def ListAgents(
        self, request: scheduler_pb2.ListAgentsRequest, context: Any
    ) -> scheduler_pb2.ListAgentsResponse:
        async with self.db.connection() as conn:
            rows = await store.agents(conn, include_lost=request.include_lost)
            held = await self._held(conn, [a.id for a in rows])
        return scheduler_pb2.ListAgentsResponse(
            agents=[self._agent(a, held.get(a.id, {})) for a in rows]
        )

    async def GetAgent(
        self, request: scheduler_pb2.GetAgentRequest, context: Any
    ) -> scheduler_pb2.Agent:
        async with self.db.connection() as conn:
            row = await store.get_agent(conn, request.agent_id)
            if row is None:
                raise NotFound(f"no agent {request.agent_id!r} has registered")
            held = await self._held(conn, [row.id])
        return self._agent(row, held.get(row.id, {}))

    @staticmethod
    async def _held(conn: Connection, agent_ids: list[str]) -> dict[str, dict[int, str]]:
        """For each agent, which job holds each of its GPUs."""
        rows = await conn.fetch(
            """SELECT n.agent_id, n.job_id, n.gpus FROM job_nodes n
               JOIN jobs j ON j.id = n.job_id AND j.attempt = n.attempt
               WHERE n.agent_id = ANY($1) AND j.state IN ('assigned', 'running')
                 AND n.finished_at IS NULL""",
            agent_ids,
        )
        out: dict[str, dict[int, str]] = {}
        for r in rows:
            for gpu in r["gpus"] or [-1]:
                out.setdefault(r["agent_id"], {})[gpu] = r["job_id"]
        return out

    def _agent(self, row: store.AgentRow, held: dict[int, str]) -> scheduler_pb2.Agent:
        # This replica's latest heartbeat is fresher than what the leader last stored.
        inventory = self.monitor.inventories.get(row.id) or Inventory.model_validate(row.inventory)
        seen = self.monitor.seen_at.get(row.id, row.last_seen_at)
        return scheduler_pb2.Agent(
            id=row.id,
            hostname=row.hostname,
            state=row.state,
            simulated=row.simulated or inventory.simulated,
            gpus=[
                scheduler_pb2.Gpu(
                    index=g.index,
                    uuid=g.uuid,
                    model=g.model,
                    memory_total_mib=g.memory_total_mib,
                    memory_used_mib=g.memory_used_mib,
                    utilization_pct=g.utilization_pct if g.utilization_pct is not None else 0.0,
                    temperature_c=g.temperature_c or 0.0,
                    power_w=g.power_w or 0.0,
                    job_id=held.get(g.index, ""),
                    busy_foreign=g.busy_foreign,
                )
                for g in inventory.gpus
            ],
            capabilities=inventory.capabilities,
            millicores=inventory.millicores,
            memory_mib=inventory.memory_mib,
            registered_at=timestamp(row.registered_at),
            last_seen_at=timestamp(max(seen, row.last_seen_at)),
            jobs=sorted(set(held.values())),
            cpu_pct=inventory.cpu_pct or 0.0,
            address=inventory.address,
        )
