"""SQL for the `scheduler` schema: runs, stages, jobs and their nodes, agents, leadership.

Every function takes the connection (usually a transaction) it runs on; the engine decides what
goes into one transaction. Metric summaries may hold NaN and ±inf, which JSON in PostgreSQL
cannot: they are stored as the strings "NaN", "Infinity" and "-Infinity" and read back as floats.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import asyncpg

from ciuic_common.db import Connection
from ciuic_common.errors import FailedPrecondition

__all__ = [
    "AgentRow",
    "Deposed",
    "JobRow",
    "NodeRow",
    "RunRow",
    "StageRow",
]

LIVE_JOB_STATES = ("queued", "assigned", "running")
ENDED_JOB_STATES = ("succeeded", "failed", "stopped", "timed_out", "lost", "cancelled")


class Deposed(FailedPrecondition):
    """Another replica leads now: this one must not change anything."""


def _row(cls: type[Any], record: asyncpg.Record) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in dict(record).items() if k in names})


@dataclass
class RunRow:
    id: str
    repository: str
    commit_sha: str
    ref: str
    pipeline: str | None
    pusher: str | None
    spec: dict[str, Any]
    state: str
    reason: str | None
    best_trial: int | None
    cancel_requested_by: str | None
    cancel_reason: str | None
    created_at: datetime
    finished_at: datetime | None


@dataclass
class StageRow:
    run_id: str
    name: str
    position: int
    kind: str
    needs: list[str]
    service: str | None
    state: str
    reason: str | None
    timeout_s: float | None
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    started_at: datetime | None
    finished_at: datetime | None


@dataclass
class JobRow:
    id: str
    run_id: str
    stage: str
    kind: str
    name: str
    trial: int | None
    hparams: dict[str, Any]
    state: str
    reason: str | None
    project: str
    priority: int
    nodes: int
    gpus_per_node: int
    millicores: int
    memory_mib: int
    capability: str | None
    attempt: int
    failures: int
    max_retries: int
    excluded_agents: list[str]
    work: dict[str, Any]
    timeout_s: float | None
    runtime_estimate_s: float | None
    queued_at: datetime | None
    assigned_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    metrics: dict[str, dict[str, float]]
    objective: float | None
    artifacts: list[str]
    stop_requested_at: datetime | None
    stop_requested_by: str | None
    stop_reason: str | None
    stopped_by: str | None

    @property
    def ended(self) -> bool:
        return self.state in ENDED_JOB_STATES


@dataclass
class NodeRow:
    job_id: str
    attempt: int
    rank: int
    agent_id: str
    gpus: list[int]
    state: str
    exit_code: int | None
    reason: str | None
    accepted_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


@dataclass
class AgentRow:
    id: str
    hostname: str
    simulated: bool
    inventory: dict[str, Any]
    state: str
    registered_at: datetime
    last_seen_at: datetime
    lost_at: datetime | None


# --- metric summaries with NaN --------------------------------------------------------------

_SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _json_float(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def encode_metrics(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    return {
        k: {s: _json_float(float(v)) for s, v in summary.items()} for k, summary in metrics.items()
    }


def decode_metrics(stored: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    return {
        k: {s: _SPECIAL[v] if isinstance(v, str) else float(v) for s, v in summary.items()}
        for k, summary in stored.items()
    }


def _job(record: asyncpg.Record) -> JobRow:
    job: JobRow = _row(JobRow, record)
    job.metrics = decode_metrics(job.metrics)
    return job


# --- leadership -----------------------------------------------------------------------------


async def claim_term(conn: Connection, holder: str) -> int:
    """Open a new term for `holder` (the replica holding the leader lock) and return it: every
    change of an older term fails from now on (see `fence`)."""
    term: int = await conn.fetchval(
        "UPDATE leadership SET term = term + 1, holder = $1, since = now() WHERE id = 1"
        " RETURNING term",
        holder,
    )
    return term


async def fence(tx: Connection, term: int) -> None:
    """Fail unless `term` still leads; held until the transaction ends, so a new leader's claim
    waits for this change to commit and then sees it."""
    current = await tx.fetchval("SELECT term FROM leadership WHERE id = 1 FOR SHARE")
    if current != term:
        raise Deposed(f"term {term} no longer leads (term {current} does)")


# --- runs and stages ------------------------------------------------------------------------


async def insert_run(
    tx: Connection,
    *,
    run_id: str,
    request_event_id: str,
    repository: str,
    commit: str,
    ref: str,
    pipeline: str | None,
    pusher: str | None,
    spec: Mapping[str, Any],
) -> bool:
    """Create the run; False when this request already created one."""
    status = await tx.execute(
        """INSERT INTO runs (id, request_event_id, repository, commit_sha, ref, pipeline, pusher,
                             spec, state)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'running')
           ON CONFLICT (request_event_id) DO NOTHING""",
        run_id, request_event_id, repository, commit, ref, pipeline, pusher, spec,
    )  # fmt: skip
    return status.endswith(" 1")


async def insert_stages(tx: Connection, run_id: str, stages: Iterable[Mapping[str, Any]]) -> None:
    await tx.executemany(
        """INSERT INTO stages (run_id, name, position, kind, needs, service, timeout_s, inputs)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        [
            (run_id, s["name"], s["position"], s["kind"], list(s["needs"]), s["service"],
             s["timeout_s"], s["inputs"])
            for s in stages
        ],
    )  # fmt: skip


async def insert_jobs(tx: Connection, jobs: Iterable[Mapping[str, Any]]) -> None:
    await tx.executemany(
        """INSERT INTO jobs (id, run_id, stage, kind, name, trial, hparams, project, priority,
                             nodes, gpus_per_node, millicores, memory_mib, capability,
                             max_retries, work, timeout_s)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)""",
        [
            (j["id"], j["run_id"], j["stage"], j["kind"], j["name"], j["trial"], j["hparams"],
             j["project"], j["priority"], j["nodes"], j["gpus_per_node"], j["millicores"],
             j["memory_mib"], j["capability"], j["max_retries"], j["work"], j["timeout_s"])
            for j in jobs
        ],
    )  # fmt: skip


async def lock_run(tx: Connection, run_id: str) -> RunRow | None:
    """The run, locked for the rest of the transaction (one change to a run at a time)."""
    record = await tx.fetchrow("SELECT * FROM runs WHERE id = $1 FOR UPDATE", run_id)
    return None if record is None else _row(RunRow, record)


async def get_run(conn: Connection, run_id: str) -> RunRow | None:
    record = await conn.fetchrow("SELECT * FROM runs WHERE id = $1", run_id)
    return None if record is None else _row(RunRow, record)


async def resolve_run_id(conn: Connection, prefix: str) -> list[str]:
    """Run ids starting with `prefix` (at most two: enough to tell it is ambiguous)."""
    rows = await conn.fetch(
        "SELECT id FROM runs WHERE id LIKE $1 || '%' ORDER BY id LIMIT 2",
        prefix.replace("%", "").replace("_", r"\_"),
    )
    return [r["id"] for r in rows]


async def list_runs(
    conn: Connection,
    *,
    limit: int,
    before: tuple[datetime, str] | None,
    repository: str | None,
    state: str | None,
) -> list[RunRow]:
    """Runs newest first, after the `(created_at, id)` cursor of the previous page."""
    rows = await conn.fetch(
        """SELECT * FROM runs
           WHERE ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2))
             AND ($3::text IS NULL OR repository = $3)
             AND ($4::text IS NULL OR state = $4)
           ORDER BY created_at DESC, id DESC LIMIT $5""",
        before[0] if before else None, before[1] if before else "", repository, state, limit,
    )  # fmt: skip
    return [_row(RunRow, r) for r in rows]


async def stages_of(conn: Connection, run_ids: Sequence[str]) -> dict[str, list[StageRow]]:
    rows = await conn.fetch(
        "SELECT * FROM stages WHERE run_id = ANY($1) ORDER BY run_id, position", list(run_ids)
    )
    out: dict[str, list[StageRow]] = {run_id: [] for run_id in run_ids}
    for r in rows:
        out[r["run_id"]].append(_row(StageRow, r))
    return out


async def update_stage(
    tx: Connection,
    run_id: str,
    name: str,
    *,
    state: str,
    reason: str | None = None,
    outputs: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Any] | None = None,
    service: str | None = None,
) -> None:
    """Move a stage; `started_at` is set when it first leaves pending, `finished_at` when it
    ends; `service` names who a waiting stage waits for, when not the stage kind's own."""
    await tx.execute(
        """UPDATE stages SET
               state = $3,
               reason = $4,
               outputs = COALESCE($5, outputs),
               inputs = COALESCE($6, inputs),
               service = COALESCE($7, service),
               started_at = CASE WHEN started_at IS NULL AND $3 <> 'pending' THEN now()
                                 ELSE started_at END,
               finished_at = CASE WHEN $3 IN ('succeeded', 'failed', 'cancelled') THEN now()
                                  ELSE NULL END
           WHERE run_id = $1 AND name = $2""",
        run_id, name, state, reason, outputs, inputs, service,
    )  # fmt: skip


async def finish_run(
    tx: Connection, run_id: str, state: str, reason: str | None, best_trial: int | None = None
) -> None:
    await tx.execute(
        "UPDATE runs SET state = $2, reason = $3, finished_at = now(),"
        " best_trial = COALESCE($4, best_trial) WHERE id = $1",
        run_id, state, reason, best_trial,
    )  # fmt: skip


async def set_best_trial(tx: Connection, run_id: str, trial: int) -> None:
    await tx.execute("UPDATE runs SET best_trial = $2 WHERE id = $1", run_id, trial)


async def request_cancel(tx: Connection, run_id: str, requested_by: str, reason: str) -> None:
    await tx.execute(
        "UPDATE runs SET cancel_requested_by = $2, cancel_reason = $3"
        " WHERE id = $1 AND cancel_requested_by IS NULL",
        run_id,
        requested_by,
        reason,
    )


async def runs_to_cancel(conn: Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT id FROM runs WHERE state = 'running' AND cancel_requested_by IS NOT NULL"
    )
    return [r["id"] for r in rows]


async def save_job_result(
    tx: Connection,
    job_id: str,
    *,
    metrics: Mapping[str, Mapping[str, float]],
    artifacts: Sequence[str],
    exit_code: int | None,
) -> None:
    """Keep rank 0's report until every node of the attempt has ended."""
    await tx.execute(
        "UPDATE jobs SET metrics = $2, artifacts = $3, exit_code = $4 WHERE id = $1",
        job_id, encode_metrics(metrics), list(artifacts), exit_code,
    )  # fmt: skip


async def unacknowledged(conn: Connection, seconds: float) -> list[JobRow]:
    """Assigned jobs whose agents have not all accepted within `seconds`."""
    rows = await conn.fetch(
        "SELECT * FROM jobs WHERE state = 'assigned'"
        " AND assigned_at < now() - make_interval(secs => $1)",
        seconds,
    )
    return [_job(r) for r in rows]


async def overrunning(conn: Connection, slack: float) -> list[JobRow]:
    """Running jobs past their timeout (plus `slack` for their agent to enforce it) that nobody
    has asked to stop yet."""
    rows = await conn.fetch(
        """SELECT * FROM jobs WHERE state = 'running' AND timeout_s IS NOT NULL
             AND stop_requested_at IS NULL
             AND started_at < now() - make_interval(secs => timeout_s + $1)""",
        slack,
    )
    return [_job(r) for r in rows]


async def unconfirmed_stops(conn: Connection, seconds: float) -> list[JobRow]:
    """Jobs asked to stop more than `seconds` ago whose agents never confirmed."""
    rows = await conn.fetch(
        """SELECT * FROM jobs WHERE state IN ('assigned', 'running')
             AND stop_requested_at < now() - make_interval(secs => $1)""",
        seconds,
    )
    return [_job(r) for r in rows]


async def queued_stop_requests(conn: Connection) -> list[JobRow]:
    rows = await conn.fetch(
        "SELECT * FROM jobs WHERE state = 'queued' AND stop_requested_at IS NOT NULL"
    )
    return [_job(r) for r in rows]


async def overdue_stages(conn: Connection) -> list[StageRow]:
    rows = await conn.fetch(
        """SELECT s.* FROM stages s JOIN runs r ON r.id = s.run_id
           WHERE r.state = 'running' AND s.state IN ('queued', 'running', 'waiting')
             AND s.timeout_s IS NOT NULL
             AND s.started_at < now() - make_interval(secs => s.timeout_s)"""
    )
    return [_row(StageRow, r) for r in rows]


# --- jobs -----------------------------------------------------------------------------------


async def jobs_of_run(conn: Connection, run_id: str) -> list[JobRow]:
    rows = await conn.fetch(
        """SELECT j.* FROM jobs j JOIN stages s ON s.run_id = j.run_id AND s.name = j.stage
           WHERE j.run_id = $1 ORDER BY s.position, j.trial NULLS FIRST, j.id""",
        run_id,
    )
    return [_job(r) for r in rows]


async def get_job(conn: Connection, job_id: str, *, lock: bool = False) -> JobRow | None:
    query = "SELECT * FROM jobs WHERE id = $1" + (" FOR UPDATE" if lock else "")
    record = await conn.fetchrow(query, job_id)
    return None if record is None else _job(record)


async def resolve_job_id(conn: Connection, prefix: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT id FROM jobs WHERE id LIKE $1 || '%' ORDER BY id LIMIT 2",
        prefix.replace("%", "").replace("_", r"\_"),
    )
    return [r["id"] for r in rows]


async def list_jobs(
    conn: Connection,
    *,
    limit: int,
    after: str | None,
    run_id: str | None,
    state: str | None,
    agent_id: str | None,
) -> list[JobRow]:
    rows = await conn.fetch(
        """SELECT j.* FROM jobs j
           WHERE ($1::text IS NULL OR j.id > $1)
             AND ($2::text IS NULL OR j.run_id = $2)
             AND ($3::text IS NULL OR j.state = $3)
             AND ($4::text IS NULL OR EXISTS (
                   SELECT 1 FROM job_nodes n
                   WHERE n.job_id = j.id AND n.attempt = j.attempt AND n.agent_id = $4))
           ORDER BY j.id LIMIT $5""",
        after, run_id, state, agent_id, limit,
    )  # fmt: skip
    return [_job(r) for r in rows]


async def queue_job(
    tx: Connection,
    job_id: str,
    *,
    work: Mapping[str, Any] | None = None,
    hparams: Mapping[str, Any] | None = None,
    runtime_estimate_s: float | None = None,
    reason: str | None = None,
) -> None:
    await tx.execute(
        """UPDATE jobs SET state = 'queued', queued_at = now(), reason = $2,
                           work = COALESCE($3, work), hparams = COALESCE($4, hparams),
                           runtime_estimate_s = $5
           WHERE id = $1""",
        job_id, reason, work, hparams, runtime_estimate_s,
    )  # fmt: skip


async def set_job_reason(tx: Connection, job_id: str, reason: str | None) -> None:
    await tx.execute("UPDATE jobs SET reason = $2 WHERE id = $1", job_id, reason)


async def assign_job(
    tx: Connection, job_id: str, nodes: Sequence[tuple[int, str, Sequence[int]]]
) -> JobRow | None:
    """Move a queued job to `assigned` with its nodes as a new attempt; None when it is no longer
    queued or someone asked to stop it meanwhile: nothing is placed then."""
    record = await tx.fetchrow(
        """UPDATE jobs SET state = 'assigned', attempt = attempt + 1, assigned_at = now(),
                           started_at = NULL, reason = NULL
           WHERE id = $1 AND state = 'queued' AND stop_requested_at IS NULL RETURNING *""",
        job_id,
    )
    if record is None:
        return None
    job = _job(record)
    await tx.executemany(
        "INSERT INTO job_nodes (job_id, attempt, rank, agent_id, gpus) VALUES ($1, $2, $3, $4, $5)",
        [(job_id, job.attempt, rank, agent, list(gpus)) for rank, agent, gpus in nodes],
    )
    return job


async def nodes_of(conn: Connection, job_id: str, attempt: int) -> list[NodeRow]:
    rows = await conn.fetch(
        "SELECT * FROM job_nodes WHERE job_id = $1 AND attempt = $2 ORDER BY rank", job_id, attempt
    )
    return [_row(NodeRow, r) for r in rows]


async def nodes_of_jobs(conn: Connection, job_ids: Sequence[str]) -> dict[str, list[NodeRow]]:
    """The nodes of each job's current attempt."""
    rows = await conn.fetch(
        """SELECT n.* FROM job_nodes n JOIN jobs j ON j.id = n.job_id AND j.attempt = n.attempt
           WHERE n.job_id = ANY($1) ORDER BY n.job_id, n.rank""",
        list(job_ids),
    )
    out: dict[str, list[NodeRow]] = {job_id: [] for job_id in job_ids}
    for r in rows:
        out[r["job_id"]].append(_row(NodeRow, r))
    return out


async def mark_node(
    tx: Connection,
    job_id: str,
    attempt: int,
    rank: int,
    *,
    state: str,
    exit_code: int | None = None,
    reason: str | None = None,
) -> bool:
    """Record a node's progress or end; False if it had already ended (a duplicate event)."""
    ended = state not in ("assigned", "accepted", "running")
    status = await tx.execute(
        """UPDATE job_nodes SET
               state = $4,
               exit_code = COALESCE($5, exit_code),
               reason = COALESCE($6, reason),
               accepted_at = CASE WHEN $4 = 'accepted' THEN now() ELSE accepted_at END,
               started_at = CASE WHEN $4 = 'running' THEN now() ELSE started_at END,
               finished_at = CASE WHEN $7 THEN now() ELSE NULL END
           WHERE job_id = $1 AND attempt = $2 AND rank = $3 AND finished_at IS NULL
             AND NOT ($4 = 'accepted' AND state = 'running')""",
        job_id, attempt, rank, state, exit_code, reason, ended,
    )  # fmt: skip
    return status.endswith(" 1")


async def set_job_running(tx: Connection, job_id: str) -> None:
    await tx.execute(
        "UPDATE jobs SET state = 'running', started_at = COALESCE(started_at, now())"
        " WHERE id = $1 AND state = 'assigned'",
        job_id,
    )


async def request_stop(tx: Connection, job_id: str, requested_by: str, reason: str) -> None:
    await tx.execute(
        """UPDATE jobs SET stop_requested_at = now(), stop_requested_by = $2, stop_reason = $3
           WHERE id = $1 AND stop_requested_at IS NULL""",
        job_id, requested_by, reason,
    )  # fmt: skip


async def end_job(
    tx: Connection,
    job_id: str,
    *,
    state: str,
    reason: str | None,
    exit_code: int | None = None,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    objective: float | None = None,
    artifacts: Sequence[str] | None = None,
    stopped_by: str | None = None,
) -> None:
    await tx.execute(
        """UPDATE jobs SET state = $2, reason = $3, exit_code = $4,
                           metrics = COALESCE($5, metrics), objective = $6,
                           artifacts = COALESCE($7, artifacts), stopped_by = $8,
                           finished_at = now()
           WHERE id = $1""",
        job_id, state, reason, exit_code, encode_metrics(metrics) if metrics else None,
        objective, list(artifacts) if artifacts else None, stopped_by,
    )  # fmt: skip


async def requeue_job(
    tx: Connection, job_id: str, *, reason: str, exclude: Sequence[str], failed: bool
) -> None:
    """Back to the queue for another attempt, away from `exclude`."""
    await tx.execute(
        """UPDATE jobs SET state = 'queued', queued_at = now(), reason = $2,
                           failures = failures + $4::int, stop_requested_at = NULL,
                           stop_requested_by = NULL, stop_reason = NULL,
                           excluded_agents = ARRAY(SELECT DISTINCT unnest(excluded_agents || $3))
           WHERE id = $1""",
        job_id, reason, list(exclude), 1 if failed else 0,
    )  # fmt: skip


async def cancel_pending_jobs(tx: Connection, run_id: str, reason: str) -> list[str]:
    rows = await tx.fetch(
        """UPDATE jobs SET state = 'cancelled', reason = $2, finished_at = now()
           WHERE run_id = $1 AND state IN ('pending', 'queued') RETURNING id""",
        run_id, reason,
    )  # fmt: skip
    return [r["id"] for r in rows]


async def learned_runtime(conn: Connection, project: str, name: str) -> float | None:
    """The median run time of this job's last five successes in the project, seconds."""
    value = await conn.fetchval(
        """SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds) FROM (
               SELECT extract(epoch FROM finished_at - started_at) AS seconds FROM jobs
               WHERE project = $1 AND name = $2 AND state = 'succeeded'
                 AND started_at IS NOT NULL
               ORDER BY finished_at DESC LIMIT 5) recent""",
        project, name,
    )  # fmt: skip
    return None if value is None or value <= 0 else float(value)


async def live_jobs(conn: Connection) -> list[JobRow]:
    rows = await conn.fetch(
        "SELECT * FROM jobs WHERE state = ANY($1) ORDER BY queued_at, id", list(LIVE_JOB_STATES)
    )
    return [_job(r) for r in rows]


# --- agents ---------------------------------------------------------------------------------


async def upsert_agent(
    tx: Connection, agent_id: str, hostname: str, simulated: bool, inventory: Mapping[str, Any]
) -> None:
    await tx.execute(
        """INSERT INTO agents (id, hostname, simulated, inventory)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (id) DO UPDATE SET hostname = $2, simulated = $3, inventory = $4,
               state = 'alive', last_seen_at = now(), lost_at = NULL,
               registered_at = CASE WHEN agents.state = 'lost' THEN now()
                                    ELSE agents.registered_at END""",
        agent_id, hostname, simulated, inventory,
    )  # fmt: skip


async def touch_agents(
    conn: Connection, seen: Sequence[tuple[str, datetime, dict[str, Any]]]
) -> None:
    """Store the latest heartbeat of each agent (time and inventory), in one round trip."""
    await conn.executemany(
        "UPDATE agents SET last_seen_at = $2, inventory = $3 WHERE id = $1 AND state = 'alive'",
        seen,
    )


async def mark_agent_lost(tx: Connection, agent_id: str) -> None:
    await tx.execute(
        "UPDATE agents SET state = 'lost', lost_at = now() WHERE id = $1 AND state = 'alive'",
        agent_id,
    )


async def agents(conn: Connection, *, include_lost: bool = True) -> list[AgentRow]:
    rows = await conn.fetch(
        "SELECT * FROM agents WHERE $1 OR state = 'alive' ORDER BY id", include_lost
    )
    return [_row(AgentRow, r) for r in rows]


async def get_agent(conn: Connection, agent_id: str) -> AgentRow | None:
    record = await conn.fetchrow("SELECT * FROM agents WHERE id = $1", agent_id)
    return None if record is None else _row(AgentRow, record)


async def unfinished_nodes_on(conn: Connection, agent_id: str) -> list[NodeRow]:
    """Nodes of jobs' current attempts on `agent_id` that have not ended."""
    rows = await conn.fetch(
        """SELECT n.* FROM job_nodes n JOIN jobs j ON j.id = n.job_id AND j.attempt = n.attempt
           WHERE n.agent_id = $1 AND n.finished_at IS NULL AND j.state IN ('assigned', 'running')
           ORDER BY n.job_id, n.rank""",
        agent_id,
    )
    return [_row(NodeRow, r) for r in rows]


async def jobs_on_agents(conn: Connection, agent_ids: Sequence[str]) -> dict[str, list[str]]:
    rows = await conn.fetch(
        """SELECT n.agent_id, n.job_id FROM job_nodes n
           JOIN jobs j ON j.id = n.job_id AND j.attempt = n.attempt
           WHERE n.agent_id = ANY($1) AND j.state IN ('assigned', 'running')
           ORDER BY n.job_id""",
        list(agent_ids),
    )
    out: dict[str, list[str]] = {a: [] for a in agent_ids}
    for r in rows:
        out[r["agent_id"]].append(r["job_id"])
    return out
