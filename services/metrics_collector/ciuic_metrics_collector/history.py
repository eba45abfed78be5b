"""History: what the collector learns of runs from the scheduler's events, the comparison of a
run with its baseline, and the answer to validation stages that wait for a baseline.

A validation stage whose gates name `baseline` waits for this service (RunStageChanged with
state `waiting` and service `metrics_collector`). The answer, BaselineResolved, goes out through
the outbox: the best earlier run of the same repository, pipeline and branch on the same
objective, and for each metric the gates name, that run's value: the last value its job of the
same validation stage logged, else its best trial's last value.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from ciuic_common.db import Connection, Database
from ciuic_common.errors import InvalidArgument, NotFound
from ciuic_common.events import (
    BaselineResolved,
    JobChanged,
    RunCreated,
    RunFinished,
    RunStageChanged,
)
from ciuic_common.logging import get_logger
from ciuic_common.outbox import Outbox
from ciuic_metrics_collector import store
from ciuic_metrics_collector.compare import (
    Candidate,
    MetricVerdict,
    best_trial_fields,
    choose_baseline,
    compare,
)
from ciuic_metrics_collector.store import RunInfo

__all__ = ["SERVICE", "Comparison", "History", "resolve_run_id"]

log = get_logger(__name__)

#: The name validation stages wait for (the scheduler's BASELINE_SERVICE).
SERVICE = "metrics_collector"
_BASELINE_IDS = uuid.UUID("5d6f0f4e-8f1c-4d8e-9a51-6b1f1c9e0c11")


@dataclass(frozen=True)
class Comparison:
    run_id: str
    baseline_run_id: str | None
    reason: str
    metrics: list[MetricVerdict]


async def resolve_run_id(conn: Connection, given: str) -> str:
    """The full run id for an id or a unique prefix of one."""
    if not given:
        raise InvalidArgument("run_id is required")
    found = await store.resolve_run_ids(conn, given)
    if not found:
        raise NotFound(f"the metrics collector knows no run with an id starting {given!r}")
    if found[0] == given:
        return given
    if len(found) > 1:
        raise InvalidArgument(f"{given!r} names several runs ({', '.join(found)}); give more")
    return found[0]


def _where(run: RunInfo) -> str:
    pipeline = f"pipeline {run.pipeline}" if run.pipeline else "the unnamed pipeline"
    return f"{pipeline} on {run.ref} in {run.repository}"


class History:
    """Handlers of the run events, and the history queries built on them."""

    def __init__(self, db: Database, outbox: Outbox) -> None:
        self.db = db
        self.outbox = outbox

    # -- events ----------------------------------------------------------------------------
    async def on_run_created(self, event: RunCreated) -> None:
        async with self.db.transaction() as tx:
            await store.upsert_run(
                tx,
                event.run_id,
                repository=event.repository,
                commit_sha=event.commit,
                ref=event.ref,
                pipeline=event.pipeline,
                created_at=event.occurred_at,
            )

    async def on_run_finished(self, event: RunFinished) -> None:
        async with self.db.transaction() as tx:
            await store.upsert_run(
                tx, event.run_id, outcome=event.outcome, finished_at=event.occurred_at
            )

    async def on_job_changed(self, event: JobChanged) -> None:
        async with self.db.transaction() as tx:
            run = await store.upsert_run(tx, event.run_id)
            await store.upsert_job(tx, run, event.job_id, event.stage, event.state)

    async def on_stage_changed(self, event: RunStageChanged) -> None:
        async with self.db.transaction() as tx:
            fields: dict[str, Any] = {}
            if event.stage_kind == "training" and event.state == "succeeded":
                fields |= best_trial_fields(event.outputs)
            model = event.inputs.get("model")
            if event.state == "waiting" and isinstance(model, dict):
                # Later stages carry the best trial as the scheduler recorded it.
                if isinstance(model.get("best_job"), str):
                    fields["best_job"] = model["best_job"]
                if isinstance(model.get("objective"), int | float):
                    fields["objective_value"] = float(model["objective"])
            for key in ("repository", "ref", "pipeline"):
                if event.state == "waiting" and isinstance(event.inputs.get(key), str):
                    fields[key] = event.inputs[key]
            run = await store.upsert_run(tx, event.run_id, **fields)
            await store.upsert_stage(
                tx, run, event.stage, event.stage_kind, event.state, event.reason
            )
            if not (event.state == "waiting" and event.service == SERVICE):
                return
            job_id = event.inputs.get("job_id")
            if isinstance(job_id, str):
                await store.upsert_job(tx, run, job_id, event.stage, None)
            metrics = [m for m in event.inputs.get("metrics", []) if isinstance(m, str)]
            answer = await self._baseline_for_stage(tx, event, metrics)
            await self.outbox.add(tx, answer)
            log.info(
                "baseline_resolved",
                run_id=event.run_id,
                stage=event.stage,
                baseline_run_id=answer.baseline_run_id,
                baseline=answer.baseline,
            )

    async def _baseline_for_stage(
        self, tx: Connection, event: RunStageChanged, metrics: list[str]
    ) -> BaselineResolved:
        run = await store.run_info(tx, event.run_id)
        assert run is not None  # upserted above
        # The same answer for a redelivered request: JetStream and the outbox drop the copy.
        event_id = str(uuid.uuid5(_BASELINE_IDS, f"{event.event_id}"))
        chosen, reason = await self._choose(tx, run)
        if chosen is None:
            return BaselineResolved(
                event_id=event_id, run_id=run.run_id, stage=event.stage, reason=reason
            )
        base = await store.run_info(tx, chosen.run_id)
        assert base is not None
        values: dict[str, float] = {}
        notes: list[str] = []
        stage_job = await store.stage_job(tx, base.id, event.stage)
        if stage_job is not None:
            values = await store.last_values(tx, stage_job, metrics, source=None)
            if values:
                notes.append(f"{', '.join(sorted(values))} from its {event.stage} job {stage_job}")
        missing = [m for m in metrics if m not in values]
        if missing:
            best = await store.best_job(tx, base)
            if best is not None:
                more = await store.last_values(tx, best, missing, source=None)
                values |= more
                if more:
                    notes.append(f"{', '.join(sorted(more))} from its best trial {best}")
        missing = [m for m in metrics if m not in values]
        if missing:
            notes.append(f"it never logged {', '.join(missing)}")
        detail = f"baseline {base.run_id}: {reason}" + (f"; {'; '.join(notes)}" if notes else "")
        return BaselineResolved(
            event_id=event_id,
            run_id=run.run_id,
            stage=event.stage,
            baseline_run_id=base.run_id,
            baseline=values,
            reason=detail,
        )

    async def _choose(self, conn: Connection, run: RunInfo) -> tuple[Candidate | None, str]:
        if not run.repository or not run.ref:
            return None, f"the collector has not heard where run {run.run_id} comes from yet"
        candidates = await store.earlier_runs(conn, run)
        return choose_baseline(run.objective, candidates, _where(run))

    # -- queries ---------------------------------------------------------------------------
    async def compare_run(
        self, run_id: str, baseline_run_id: str = "", keys: list[str] | None = None
    ) -> Comparison:
        """A run's metrics (its best trial's last values) beside its baseline's."""
        async with self.db.connection() as conn:
            full = await resolve_run_id(conn, run_id)
            run = await store.run_info(conn, full)
            assert run is not None
            if baseline_run_id:
                base_id: str | None = await resolve_run_id(conn, baseline_run_id)
                reason = "the baseline given"
            else:
                chosen, reason = await self._choose(conn, run)
                base_id = chosen.run_id if chosen is not None else None
            values = await self._values(conn, run, keys or [])
            if base_id is None:
                return Comparison(full, None, reason, [])
            base = await store.run_info(conn, base_id)
            assert base is not None
            baseline = await self._values(conn, base, keys or [])
        verdicts = compare(values, baseline, keys or [], run.objective)
        return Comparison(full, base_id, reason, verdicts)

    @staticmethod
    async def _values(conn: Connection, run: RunInfo, keys: list[str]) -> dict[str, float]:
        best = await store.best_job(conn, run)
        if best is not None:
            return await store.last_values(conn, best, keys)
        return await store.busiest_last_values(conn, run.id, keys)
