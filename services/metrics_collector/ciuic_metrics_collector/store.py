"""SQL for the `metrics_collector` schema: interned ids, points, summaries, rollups, batches,
and what the collector knows of runs for history.

Every function takes the connection (often a transaction) it runs on; the caller decides what
goes into one transaction. Run, job and metric names are interned to integers once and cached
by the ingest path; a series is (run, job, metric).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from ciuic_common.db import Connection
from ciuic_metrics_collector.compare import Candidate, Objective
from ciuic_metrics_collector.rollups import Bucket, SeriesDelta

__all__ = [
    "NOTIFY_CHANNEL",
    "RunInfo",
    "SeriesRow",
]

#: PostgreSQL channel an ingest transaction notifies (payload: the run id) when it commits.
NOTIFY_CHANNEL = "ciuic_metrics"

SeriesKey = tuple[str, str, str]  # run_id, job_id, metric key
PointRecord = tuple[int, int, float, datetime]  # series, step, value, time


# --- ingestion -----------------------------------------------------------------------------------


async def intern_series(conn: Connection, wanted: Mapping[SeriesKey, str]) -> dict[SeriesKey, int]:
    """The series ids of (run_id, job_id, key) -> source, created when missing (in sorted order,
    so concurrent writers never wait on each other in a cycle)."""
    keys = sorted(wanted)
    run_ids = sorted({k[0] for k in keys})
    await conn.execute(
        "INSERT INTO runs (run_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING", run_ids
    )
    runs = {
        r["run_id"]: r["id"]
        for r in await conn.fetch("SELECT id, run_id FROM runs WHERE run_id = ANY($1)", run_ids)
    }
    jobs_wanted = sorted({(k[1], k[0]) for k in keys})
    await conn.execute(
        "INSERT INTO jobs (job_id, run) SELECT * FROM unnest($1::text[], $2::int[])"
        " ON CONFLICT DO NOTHING",
        [j for j, _ in jobs_wanted],
        [runs[r] for _, r in jobs_wanted],
    )
    job_ids = [j for j, _ in jobs_wanted]
    jobs = {
        r["job_id"]: r["id"]
        for r in await conn.fetch("SELECT id, job_id FROM jobs WHERE job_id = ANY($1)", job_ids)
    }
    names = sorted({k[2] for k in keys})
    await conn.execute(
        "INSERT INTO metric_keys (key) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING", names
    )
    metric = {
        r["key"]: r["id"]
        for r in await conn.fetch("SELECT id, key FROM metric_keys WHERE key = ANY($1)", names)
    }
    triples = [(runs[r], jobs[j], metric[m]) for r, j, m in keys]
    await conn.execute(
        "INSERT INTO series (run, job, key, source)"
        " SELECT * FROM unnest($1::int[], $2::int[], $3::int[], $4::text[])"
        " ON CONFLICT DO NOTHING",
        [t[0] for t in triples],
        [t[1] for t in triples],
        [t[2] for t in triples],
        [wanted[k] for k in keys],
    )
    rows = await conn.fetch(
        "SELECT s.id, s.run, s.job, s.key FROM series s"
        " JOIN unnest($1::int[], $2::int[], $3::int[]) AS w(run, job, key)"
        " ON s.run = w.run AND s.job = w.job AND s.key = w.key",
        [t[0] for t in triples],
        [t[1] for t in triples],
        [t[2] for t in triples],
    )
    by_triple = {(r["run"], r["job"], r["key"]): r["id"] for r in rows}
    return {k: by_triple[t] for k, t in zip(keys, triples, strict=True)}


async def claim_batches(conn: Connection, event_ids: Sequence[str]) -> set[str]:
    """Record these batches as stored; the ones recorded before (redeliveries) are left out.

    A concurrent transaction claiming the same batch waits for this one and then sees it.
    """
    rows = await conn.fetch(
        "INSERT INTO batches (event_id) SELECT unnest($1::text[])"
        " ON CONFLICT DO NOTHING RETURNING event_id",
        list(event_ids),
    )
    return {r["event_id"] for r in rows}


async def copy_points(conn: Connection, records: Sequence[PointRecord]) -> None:
    """Bulk-load points (COPY); fails with UniqueViolationError if a (series, step) exists."""
    await conn.copy_records_to_table(
        "points", records=records, columns=("series", "step", "value", "time")
    )


async def insert_new_points(conn: Connection, records: Sequence[PointRecord]) -> list[PointRecord]:
    """Load points through a staging table, skipping (series, step) pairs already stored (the
    first value of a repeated step stays); returns the points actually inserted."""
    await conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS points_staging"
        " (series integer, step bigint, value float8, time timestamptz) ON COMMIT DELETE ROWS"
    )
    await conn.copy_records_to_table("points_staging", records=records)
    rows = await conn.fetch(
        "INSERT INTO points SELECT * FROM points_staging ORDER BY series, step"
        " ON CONFLICT DO NOTHING RETURNING series, step, value, time"
    )
    await conn.execute("TRUNCATE points_staging")
    return [(r["series"], r["step"], r["value"], r["time"]) for r in rows]


async def apply_deltas(conn: Connection, deltas: Mapping[int, SeriesDelta]) -> None:
    """Fold one transaction's points into the series summaries and the rollups."""
    ids = sorted(deltas)
    # Lock the series rows in id order: concurrent writers (replicas) never deadlock.
    await conn.execute("SELECT 1 FROM series WHERE id = ANY($1) ORDER BY id FOR UPDATE", ids)
    d = [deltas[i] for i in ids]
    await conn.execute(
        """UPDATE series AS s SET
               count = s.count + d.count,
               nan_count = s.nan_count + d.nan_count,
               min = LEAST(s.min, d.min),
               max = GREATEST(s.max, d.max),
               last = CASE WHEN s.last_step IS NULL OR d.last_step >= s.last_step
                           THEN d.last ELSE s.last END,
               first_step = LEAST(s.first_step, d.first_step),
               last_step = GREATEST(s.last_step, d.last_step),
               updated_at = now()
           FROM unnest($1::int[], $2::bigint[], $3::bigint[], $4::float8[], $5::float8[],
                       $6::float8[], $7::bigint[], $8::bigint[])
                AS d(id, count, nan_count, min, max, last, first_step, last_step)
           WHERE s.id = d.id""",
        ids,
        [x.count for x in d],
        [x.nan_count for x in d],
        [x.min for x in d],
        [x.max for x in d],
        [x.last for x in d],
        [x.first_step for x in d],
        [x.last_step for x in d],
    )
    buckets = [(i, b) for i in ids for width in deltas[i].buckets for b in deltas[i].buckets[width]]
    if not buckets:
        return
    columns: list[list[Any]] = [[] for _ in range(14)]
    for series, b in buckets:
        row = (
            series, b.width, b.bucket, b.count, b.nan_count, b.min, b.min_step, b.max,
            b.max_step, b.nan_step, b.first_step, b.first_time, b.last_step, b.last_time,
        )  # fmt: skip
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    await conn.execute(
        """INSERT INTO rollups AS r (series, width, bucket, count, nan_count, min, min_step, max,
                                    max_step, nan_step, first_step, first_time, last_step,
                                    last_time)
           SELECT * FROM unnest($1::int[], $2::int[], $3::bigint[], $4::int[], $5::int[],
                                $6::float8[], $7::bigint[], $8::float8[], $9::bigint[],
                                $10::bigint[], $11::bigint[], $12::timestamptz[],
                                $13::bigint[], $14::timestamptz[])
           ON CONFLICT (series, width, bucket) DO UPDATE SET
               count = r.count + excluded.count,
               nan_count = r.nan_count + excluded.nan_count,
               min = LEAST(r.min, excluded.min),
               min_step = CASE
                   WHEN excluded.min IS NULL THEN r.min_step
                   WHEN r.min IS NULL OR excluded.min < r.min THEN excluded.min_step
                   WHEN excluded.min = r.min THEN LEAST(r.min_step, excluded.min_step)
                   ELSE r.min_step END,
               max = GREATEST(r.max, excluded.max),
               max_step = CASE
                   WHEN excluded.max IS NULL THEN r.max_step
                   WHEN r.max IS NULL OR excluded.max > r.max THEN excluded.max_step
                   WHEN excluded.max = r.max THEN LEAST(r.max_step, excluded.max_step)
                   ELSE r.max_step END,
               nan_step = LEAST(r.nan_step, excluded.nan_step),
               first_step = LEAST(r.first_step, excluded.first_step),
               first_time = CASE WHEN excluded.first_step < r.first_step
                                 THEN excluded.first_time ELSE r.first_time END,
               last_step = GREATEST(r.last_step, excluded.last_step),
               last_time = CASE WHEN excluded.last_step > r.last_step
                                THEN excluded.last_time ELSE r.last_time END""",
        *columns,
    )


async def notify(conn: Connection, run_ids: Iterable[str]) -> None:
    """Tell every replica's streams that these runs have new points (delivered on commit)."""
    await conn.execute(
        "SELECT pg_notify($1, r) FROM unnest($2::text[]) AS r", NOTIFY_CHANNEL, sorted(run_ids)
    )


async def prune_batches(conn: Connection, older_than_s: float) -> int:
    """Forget stored batch ids older than any redelivery can be; returns how many."""
    status = await conn.execute(
        "DELETE FROM batches WHERE stored_at < now() - make_interval(secs => $1)", older_than_s
    )
    return int(status.split()[-1])


# --- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeriesRow:
    id: int
    run_id: str
    job_id: str
    key: str
    source: str
    count: int
    nan_count: int
    min: float | None
    max: float | None
    last: float | None
    first_step: int | None
    last_step: int | None
    updated_at: datetime | None


_SERIES = """SELECT s.id, r.run_id, j.job_id, k.key, s.source, s.count, s.nan_count, s.min, s.max,
                    s.last, s.first_step, s.last_step, s.updated_at
             FROM series s JOIN runs r ON r.id = s.run JOIN jobs j ON j.id = s.job
             JOIN metric_keys k ON k.id = s.key"""


def _series(rows: Iterable[asyncpg.Record]) -> list[SeriesRow]:
    return [SeriesRow(**dict(r)) for r in rows]


async def resolve_run_ids(conn: Connection, given: str) -> list[str]:
    """Run ids equal to `given`, or else starting with it (at most a few)."""
    rows = await conn.fetch(
        "SELECT run_id FROM runs WHERE run_id = $1"
        " UNION ALL (SELECT run_id FROM runs WHERE run_id LIKE $2 || '%' AND run_id <> $1"
        " ORDER BY run_id LIMIT 5)",
        given,
        given.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_"),
    )
    return [r["run_id"] for r in rows]


async def series_of(
    conn: Connection,
    run_ids: Sequence[str],
    keys: Sequence[str] = (),
    job_ids: Sequence[str] = (),
    *,
    stored_only: bool = True,
) -> list[SeriesRow]:
    """The series of these runs (only these keys and jobs when given), by run, job and key."""
    rows = await conn.fetch(
        f"""{_SERIES}
            WHERE r.run_id = ANY($1)
              AND (cardinality($2::text[]) = 0 OR k.key = ANY($2))
              AND (cardinality($3::text[]) = 0 OR j.job_id = ANY($3))
              AND (NOT $4 OR s.count > 0)
            ORDER BY r.run_id, j.job_id, k.key""",
        list(run_ids),
        list(keys),
        list(job_ids),
        stored_only,
    )
    return _series(rows)


async def points(
    conn: Connection, series: int, lo: int, hi: int, limit: int
) -> tuple[list[int], list[float], list[datetime]]:
    """Stored points of a series with lo <= step <= hi, in step order, at most `limit`."""
    rows = await conn.fetch(
        "SELECT step, value, time FROM points WHERE series = $1 AND step BETWEEN $2 AND $3"
        " ORDER BY step LIMIT $4",
        series,
        lo,
        hi,
        limit,
    )
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


async def rollups(conn: Connection, series: int, width: int, lo: int, hi: int) -> list[Bucket]:
    """The stored rollup buckets of `width` whose steps lie wholly in [lo, hi], in order."""
    rows = await conn.fetch(
        "SELECT bucket, count, nan_count, min, min_step, max, max_step, nan_step, first_step,"
        " first_time, last_step, last_time FROM rollups"
        " WHERE series = $1 AND width = $2 AND bucket BETWEEN $3 AND $4 ORDER BY bucket",
        series,
        width,
        lo,
        hi,
    )
    return [Bucket(width, *r) for r in rows]


async def points_after(
    conn: Connection, cursors: Mapping[int, int], limit: int
) -> list[asyncpg.Record]:
    """Up to `limit` points of each series with a step after its cursor, in step order."""
    ids = sorted(cursors)
    return list(
        await conn.fetch(
            """SELECT p.series, p.step, p.value, p.time
               FROM unnest($1::int[], $2::bigint[]) AS c(series, after)
               CROSS JOIN LATERAL (
                   SELECT series, step, value, time FROM points
                   WHERE series = c.series AND step > c.after ORDER BY step LIMIT $3) p
               ORDER BY p.series, p.step""",
            ids,
            [cursors[i] for i in ids],
            limit,
        )
    )


async def count_points(conn: Connection, run_id: str) -> int:
    """Every stored point of a run, counted from the points themselves."""
    value = await conn.fetchval(
        "SELECT count(*) FROM points p JOIN series s ON s.id = p.series"
        " JOIN runs r ON r.id = s.run WHERE r.run_id = $1",
        run_id,
    )
    return int(value)


# --- runs, for history -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunInfo:
    id: int
    run_id: str
    repository: str | None
    ref: str | None
    pipeline: str | None
    objective: Objective | None
    objective_value: float | None
    best_trial: int | None
    best_job: str | None
    outcome: str | None
    created_at: datetime | None


def _run(r: asyncpg.Record) -> RunInfo:
    objective = None
    if r["objective_metric"] and r["objective_mode"] in ("min", "max"):
        objective = Objective(r["objective_metric"], r["objective_mode"])
    return RunInfo(
        r["id"], r["run_id"], r["repository"], r["ref"], r["pipeline"], objective,
        r["objective_value"], r["best_trial"], r["best_job"], r["outcome"], r["created_at"],
    )  # fmt: skip


async def upsert_run(conn: Connection, run_id: str, **fields: Any) -> int:
    """Create the run when unknown and set the given (non-None) fields; returns its id."""
    given = {k: v for k, v in fields.items() if v is not None}
    names = list(given)
    sets = ", ".join(f"{n} = EXCLUDED.{n}" for n in names) or "run_id = EXCLUDED.run_id"
    cols = ", ".join(["run_id", *names])
    params = ", ".join(f"${i}" for i in range(1, len(names) + 2))
    value = await conn.fetchval(
        f"INSERT INTO runs ({cols}) VALUES ({params}) ON CONFLICT (run_id) DO UPDATE SET {sets}"
        " RETURNING id",
        run_id,
        *given.values(),
    )
    return int(value)


async def upsert_job(
    conn: Connection, run: int, job_id: str, stage: str | None, state: str | None
) -> None:
    await conn.execute(
        "INSERT INTO jobs (run, job_id, stage, state) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (job_id) DO UPDATE SET stage = COALESCE(EXCLUDED.stage, jobs.stage),"
        " state = COALESCE(EXCLUDED.state, jobs.state)",
        run,
        job_id,
        stage,
        state,
    )


async def upsert_stage(
    conn: Connection, run: int, name: str, kind: str, state: str, reason: str | None
) -> None:
    await conn.execute(
        "INSERT INTO stages (run, name, kind, state, reason) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (run, name) DO UPDATE SET kind = EXCLUDED.kind, state = EXCLUDED.state,"
        " reason = EXCLUDED.reason, updated_at = now()",
        run,
        name,
        kind,
        state,
        reason,
    )


_RUN = """SELECT id, run_id, repository, ref, pipeline, objective_metric, objective_mode,
                 objective_value, best_trial, best_job, outcome, created_at FROM runs"""


async def run_info(conn: Connection, run_id: str) -> RunInfo | None:
    row = await conn.fetchrow(f"{_RUN} WHERE run_id = $1", run_id)
    return _run(row) if row is not None else None


async def earlier_runs(conn: Connection, run: RunInfo) -> list[Candidate]:
    """Runs of the same repository, pipeline and branch created before `run` that did not fail
    or get cancelled: the models the pipeline accepted (or is still taking through)."""
    rows = await conn.fetch(
        f"""{_RUN}
            WHERE repository = $1 AND pipeline IS NOT DISTINCT FROM $2 AND ref = $3
              AND run_id <> $4 AND created_at IS NOT NULL
              AND ($5::timestamptz IS NULL OR created_at < $5)
              AND (outcome IS NULL OR outcome = 'succeeded')
            ORDER BY created_at DESC LIMIT 1000""",
        run.repository,
        run.pipeline,
        run.ref,
        run.run_id,
        run.created_at,
    )
    out = []
    for r in rows:
        info = _run(r)
        assert info.created_at is not None
        out.append(Candidate(info.run_id, info.created_at, info.objective, info.objective_value))
    return out


async def best_job(conn: Connection, run: RunInfo) -> str | None:
    """The run's best trial job: as the scheduler named it, else found from the trial number."""
    if run.best_job:
        return run.best_job
    if run.best_trial is None:
        # A sweep of one trial: the scheduler names no number, the one trial went on.
        only = await conn.fetch(
            "SELECT j.job_id FROM jobs j JOIN stages s ON s.run = j.run AND s.name = j.stage"
            " WHERE j.run = $1 AND s.kind = 'training' AND s.state = 'succeeded' LIMIT 2",
            run.id,
        )
        return str(only[0]["job_id"]) if len(only) == 1 else None
    found = await conn.fetchval(
        "SELECT j.job_id FROM jobs j JOIN stages s ON s.run = j.run AND s.name = j.stage"
        " WHERE j.run = $1 AND s.kind = 'training' AND j.job_id LIKE '%-trial-' || $2"
        " ORDER BY j.job_id LIMIT 1",
        run.id,
        str(run.best_trial),
    )
    return str(found) if found is not None else None


async def stage_job(conn: Connection, run: int, stage: str) -> str | None:
    """The job of a (validation) stage of a run, if the collector heard of it."""
    found = await conn.fetchval(
        "SELECT job_id FROM jobs WHERE run = $1 AND stage = $2 ORDER BY job_id LIMIT 1", run, stage
    )
    return str(found) if found is not None else None


async def last_values(
    conn: Connection, job_id: str, keys: Sequence[str] = (), source: str | None = "training"
) -> dict[str, float]:
    """The last value of each metric a job logged (only `keys` when given)."""
    rows = await conn.fetch(
        "SELECT k.key, s.last FROM series s JOIN jobs j ON j.id = s.job"
        " JOIN metric_keys k ON k.id = s.key"
        " WHERE j.job_id = $1 AND s.count > 0 AND ($2::text IS NULL OR s.source = $2)"
        " AND (cardinality($3::text[]) = 0 OR k.key = ANY($3))",
        job_id,
        source,
        list(keys),
    )
    return {r["key"]: r["last"] for r in rows}


async def busiest_last_values(
    conn: Connection, run: int, keys: Sequence[str] = ()
) -> dict[str, float]:
    """Per training metric of a run, the last value of the job that logged it most (for runs
    without a best trial)."""
    rows = await conn.fetch(
        "SELECT DISTINCT ON (k.key) k.key, s.last FROM series s"
        " JOIN metric_keys k ON k.id = s.key JOIN jobs j ON j.id = s.job"
        " WHERE s.run = $1 AND s.count > 0 AND s.source = 'training'"
        " AND (cardinality($2::text[]) = 0 OR k.key = ANY($2))"
        " ORDER BY k.key, s.count DESC, j.job_id",
        run,
        list(keys),
    )
    return {r["key"]: r["last"] for r in rows}
