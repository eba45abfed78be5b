"""The metrics collector against real NATS and PostgreSQL: batches published as agents publish
them, run events as the scheduler publishes them, answers read over gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from ciuic_common.bus import Bus
from ciuic_common.events import (
    BaselineResolved,
    JobChanged,
    MetricPoint,
    MetricsBatch,
    RunCreated,
    RunFinished,
    RunStageChanged,
)
from ciuic_common.proto import metrics_collector_pb2 as pb
from ciuic_common.proto import metrics_collector_pb2_grpc
from ciuic_common.rpc import channel
from ciuic_common.service import Service
from ciuic_metrics_collector.service import MetricsCollectorSettings, build
from ciuic_scheduler.dag import evaluate_gates

pytestmark = [pytest.mark.nats, pytest.mark.postgres]

T0 = datetime(2026, 12, 5, tzinfo=UTC)
REPO = "https://git.example.com/ml/model.git"


def settings(nats_url: str, database_url: str) -> MetricsCollectorSettings:
    return MetricsCollectorSettings(
        nats_url=nats_url,
        database_url=database_url,
        grpc_port=0,
        metrics_port=0,
        dashboard_port=0,
    )


@contextlib.asynccontextmanager
async def collector(
    nats_url: str, database_url: str
) -> AsyncIterator[tuple[Service, metrics_collector_pb2_grpc.MetricsServiceStub, Bus]]:
    service = build(settings(nats_url, database_url))
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.wait_ready(), 30)
    bus = Bus(nats_url, name="test-publisher")
    await bus.connect()
    try:
        async with channel(f"127.0.0.1:{service.grpc_port}") as ch:
            yield service, metrics_collector_pb2_grpc.MetricsServiceStub(ch), bus
    finally:
        await bus.close()
        service.request_stop()
        await asyncio.wait_for(task, 30)


async def until(check: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


def batch(
    run_id: str, job_id: str, points: dict[str, list[tuple[int, float]]], **kw: Any
) -> MetricsBatch:
    return MetricsBatch.of(
        run_id=run_id,
        job_id=job_id,
        points=[
            MetricPoint(key=key, step=step, value=value, timestamp=T0 + timedelta(seconds=step))
            for key, series in points.items()
            for step, value in series
        ],
        **kw,
    )


async def summaries(
    api: metrics_collector_pb2_grpc.MetricsServiceStub, run_id: str
) -> dict[tuple[str, str], pb.Summary]:
    response = await api.GetSummaries(pb.GetSummariesRequest(run_ids=[run_id]))
    return {(s.job_id, s.key): s for s in response.summaries}


async def stored(api: metrics_collector_pb2_grpc.MetricsServiceStub, run_id: str) -> int:
    try:
        return sum(s.count for s in (await summaries(api, run_id)).values())
    except Exception:  # NOT_FOUND until the first batch of the run is stored
        return 0


@pytest.mark.slow
async def test_a_million_points_across_ten_metrics_are_stored_completely(
    nats_url: str, database_url: str
) -> None:
    run_id, job_id = "million", "million-trial-0"
    keys = [f"metric_{i}" for i in range(10)]
    per_batch = 500  # steps per batch: 5,000 points, ~0.5 MB (NATS takes 1 MB a message)
    steps = 100_000
    async with collector(nats_url, database_url) as (_, api, bus):
        started = time.monotonic()
        window = asyncio.Semaphore(32)

        async def publish(first: int) -> None:
            async with window:
                await bus.publish(
                    batch(
                        run_id,
                        job_id,
                        {k: [(s, s * 0.001 + i) for s in range(first, first + per_batch)]
                         for i, k in enumerate(keys)},
                    )
                )  # fmt: skip

        await asyncio.gather(*(publish(f) for f in range(0, steps, per_batch)))

        async def complete() -> bool:
            return await stored(api, run_id) == 1_000_000

        await until(complete, within=120)
        elapsed = time.monotonic() - started
        found = await summaries(api, run_id)
        assert sorted(k for _, k in found) == keys
        for i, key in enumerate(keys):
            s = found[(job_id, key)]
            assert (s.count, s.nan_count, s.first_step, s.last_step) == (steps, 0, 0, steps - 1)
            assert s.min == pytest.approx(i)
            assert s.last == pytest.approx((steps - 1) * 0.001 + i)
        conn = await asyncpg.connect(database_url)
        try:
            counted = await conn.fetchval(
                "SELECT count(*) FROM metrics_collector.points p"
                " JOIN metrics_collector.series s ON s.id = p.series"
                " JOIN metrics_collector.runs r ON r.id = s.run WHERE r.run_id = $1",
                run_id,
            )
        finally:
            await conn.close()
        assert counted == 1_000_000
        curves = await api.GetCurves(pb.GetCurvesRequest(run_id=run_id, keys=["metric_3"]))
        (curve,) = curves.series
        assert curve.downsampled
        assert curve.total_points == steps
        assert 900 <= len(curve.points) <= 1000
        assert curve.points[0].step == 0
        assert curve.points[-1].step == steps - 1
        print(f"1,000,000 points stored in {elapsed:.1f}s")


async def test_a_redelivered_batch_changes_nothing(nats_url: str, database_url: str) -> None:
    run_id, job_id = "redeliver", "redeliver-trial-0"
    first = batch(run_id, job_id, {"loss": [(s, 1.0 / (s + 1)) for s in range(1000)]})
    async with collector(nats_url, database_url) as (_, api, bus):
        await bus.publish(first)

        async def thousand() -> bool:
            return await stored(api, run_id) == 1000

        await until(thousand)
        before = await summaries(api, run_id)
        # The same batch delivered again (JetStream redelivers with the same event id), and the
        # same steps re-sent under a new event id with other values.
        await bus.publish_raw(
            first.subject_for(), first.to_bytes(), "another-message-id", first.stream, first.name
        )
        resent = batch(run_id, job_id, {"loss": [(s, 99.0) for s in range(990, 1010)]})
        await bus.publish(resent)

        async def ten_more() -> bool:
            return await stored(api, run_id) == 1010

        await until(ten_more)
        await asyncio.sleep(0.5)  # and nothing else arrives later
        after = await summaries(api, run_id)
        s0, s1 = before[(job_id, "loss")], after[(job_id, "loss")]
        assert s1.count == 1010
        assert (s1.min, s1.max) == (s0.min, 99.0)
        rng = await api.GetRange(
            pb.GetRangeRequest(run_id=run_id, job_id=job_id, key="loss", from_step=985)
        )
        values = {p.step: p.value for p in rng.points}
        assert values[995] == pytest.approx(1.0 / 996)  # the first value of a step stays
        assert values[1005] == 99.0
        assert len(values) == 25


async def test_nan_and_infinity_are_stored_and_visible_in_the_downsampled_curve(
    nats_url: str, database_url: str
) -> None:
    run_id, job_id = "diverged", "diverged-trial-0"
    values = [(s, 2.0 / (s + 1)) for s in range(60_000)]
    values[31_337] = (31_337, math.nan)
    values[45_000] = (45_000, math.inf)
    values[50_000] = (50_000, -math.inf)
    async with collector(nats_url, database_url) as (_, api, bus):
        for i in range(0, 60_000, 5_000):
            await bus.publish(batch(run_id, job_id, {"train_loss": values[i : i + 5_000]}))

        async def all_in() -> bool:
            return await stored(api, run_id) == 60_000

        await until(all_in)
        curves = await api.GetCurves(pb.GetCurvesRequest(run_id=run_id, max_points=300))
        (curve,) = curves.series
        assert curve.downsampled
        assert len(curve.points) <= 300
        assert [p.step for p in curve.points if math.isnan(p.value)] == [31_337]
        drawn = {(p.step, p.value) for p in curve.points}
        assert (45_000, math.inf) in drawn
        assert (50_000, -math.inf) in drawn
        # A window narrower than any rollup reads the points themselves.
        near = await api.GetCurves(
            pb.GetCurvesRequest(run_id=run_id, from_step=31_300, to_step=31_400, max_points=20)
        )
        assert [p.step for p in near.series[0].points if math.isnan(p.value)] == [31_337]
        (summary,) = (await summaries(api, run_id)).values()
        assert (summary.nan_count, summary.max, summary.min) == (1, math.inf, -math.inf)


async def test_a_stream_delivers_a_point_published_after_it_started(
    nats_url: str, database_url: str
) -> None:
    run_id, job_id = "live", "live-trial-0"
    async with collector(nats_url, database_url) as (_, api, bus):
        await bus.publish(batch(run_id, job_id, {"loss": [(0, 1.0), (1, 0.9)]}))

        async def two() -> bool:
            return await stored(api, run_id) == 2

        await until(two)
        stream = api.StreamMetrics(pb.StreamMetricsRequest(run_id=run_id, after_step=-1))
        first = await asyncio.wait_for(stream.read(), 10)
        assert [(p.step, p.value) for p in first.series[0].points] == [(0, 1.0), (1, 0.9)]
        sent = time.monotonic()
        await bus.publish(batch(run_id, job_id, {"loss": [(2, 0.8)], "accuracy": [(2, 0.5)]}))
        seen: dict[str, list[int]] = {}
        while len(seen) < 2:
            update = await asyncio.wait_for(stream.read(), 10)
            for s in update.series:
                seen.setdefault(s.key, []).extend(p.step for p in s.points)
        assert seen == {"loss": [2], "accuracy": [2]}
        assert time.monotonic() - sent < 5
        stream.cancel()


async def publish_run(
    bus: Bus,
    run_id: str,
    *,
    minutes: int,
    val_loss: float,
    accuracy: float,
    pipeline: str = "train",
    validation_accuracy: float | None = None,
    outcome: str | None = "succeeded",
) -> None:
    """What the scheduler and an agent put on the bus for a finished run with a sweep of two
    trials (trial 1 the best) and a validation stage `quick-check`."""
    created = T0 + timedelta(minutes=minutes)
    await bus.publish(
        RunCreated(
            run_id=run_id, repository=REPO, commit="c0ffee", ref="refs/heads/main",
            pipeline=pipeline, stages=["training", "quick-check"], trials=2,
            occurred_at=created,
        )
    )  # fmt: skip
    for trial, (loss, acc) in enumerate([(val_loss + 1, accuracy - 0.1), (val_loss, accuracy)]):
        job_id = f"{run_id}-trial-{trial}"
        await bus.publish(
            JobChanged(run_id=run_id, job_id=job_id, stage="training", state="running")
        )
        await bus.publish(
            batch(run_id, job_id, {
                "val_loss": [(0, loss + 1), (1, loss)], "accuracy": [(0, acc - 0.2), (1, acc)],
            })
        )  # fmt: skip
    await bus.publish(
        RunStageChanged(
            run_id=run_id, stage="training", stage_kind="training", state="succeeded",
            reason=f"best trial 1 of 2: val_loss={val_loss:.6g} (min, last); 2 succeeded",
            outputs={
                "best_trial": 1, "best_job": f"{run_id}-trial-1", "objective": val_loss,
                "objective_spec": {"metric": "val_loss", "mode": "min", "scope": "last"},
            },
        )
    )  # fmt: skip
    if validation_accuracy is not None:
        job_id = f"{run_id}-quick-check"
        await bus.publish(
            JobChanged(run_id=run_id, job_id=job_id, stage="quick-check", state="succeeded")
        )
        await bus.publish(batch(run_id, job_id, {"accuracy": [(0, validation_accuracy)]}))
    if outcome is not None:
        await bus.publish(RunFinished(run_id=run_id, outcome=outcome))  # type: ignore[arg-type]


async def test_compare_run_picks_the_best_earlier_run_and_gives_verdicts(
    nats_url: str, database_url: str
) -> None:
    async with collector(nats_url, database_url) as (_, api, bus):
        await publish_run(bus, "aaold", minutes=1, val_loss=0.30, accuracy=0.80)
        await publish_run(bus, "aabest", minutes=2, val_loss=0.20, accuracy=0.85)
        await publish_run(
            bus, "aafailed", minutes=3, val_loss=0.05, accuracy=0.99, outcome="failed"
        )
        await publish_run(bus, "aaother", minutes=4, val_loss=0.01, accuracy=0.99, pipeline="x")
        await publish_run(bus, "aalater", minutes=9, val_loss=0.01, accuracy=0.99)
        await publish_run(bus, "aanew", minutes=5, val_loss=0.25, accuracy=0.90, outcome=None)

        async def learned() -> bool:
            try:
                c = await api.CompareRun(pb.CompareRunRequest(run_id="aanew"))
            except Exception:
                return False
            return c.baseline_run_id == "aabest" and len(c.metrics) == 2

        await until(learned)
        c = await api.CompareRun(pb.CompareRunRequest(run_id="aanew"))
        assert "val_loss" in c.reason
        got = {m.key: m for m in c.metrics}
        assert [m.key for m in c.metrics] == ["val_loss", "accuracy"]  # the objective first
        assert (got["val_loss"].verdict, got["val_loss"].better) == ("regressed", "min")
        assert got["val_loss"].delta == pytest.approx(0.05)
        assert got["val_loss"].delta_pct == pytest.approx(25.0)
        assert (got["accuracy"].verdict, got["accuracy"].better) == ("improved", "max")
        assert got["accuracy"].value == pytest.approx(0.90)  # its best trial's last value
        assert got["accuracy"].baseline == pytest.approx(0.85)
        given = await api.CompareRun(
            pb.CompareRunRequest(run_id="aanew", baseline_run_id="aaold", keys=["accuracy", "f1"])
        )
        assert given.baseline_run_id == "aaold"
        assert [(m.key, m.verdict) for m in given.metrics] == [
            ("accuracy", "improved"),
            ("f1", "missing"),
        ]
        first = await api.CompareRun(pb.CompareRunRequest(run_id="aaold"))
        assert first.baseline_run_id == ""
        assert "no earlier run" in first.reason


async def test_a_waiting_validation_stage_gets_its_baseline(
    nats_url: str, database_url: str
) -> None:
    answers: asyncio.Queue[BaselineResolved] = asyncio.Queue()
    listener = Bus(nats_url, name="test-scheduler")

    async def heard(event: BaselineResolved) -> None:
        await answers.put(event)

    listener.subscribe(BaselineResolved, heard, durable="test-baselines")
    async with collector(nats_url, database_url) as (_, api, bus):
        await listener.connect()
        await listener.start()
        try:
            await publish_run(
                bus, "bbold", minutes=1, val_loss=0.30, accuracy=0.80, validation_accuracy=0.70
            )
            await publish_run(
                bus, "bbbest", minutes=2, val_loss=0.20, accuracy=0.85, validation_accuracy=0.88
            )
            await publish_run(bus, "bbnew", minutes=3, val_loss=0.25, accuracy=0.9, outcome=None)

            async def known() -> bool:
                return await stored(api, "bbnew") == 8 and await stored(api, "bbbest") == 9

            await until(known)
            gates = ["accuracy >= baseline - 0.01", "val_loss <= baseline.val_loss + 0.1"]
            await bus.publish(
                RunStageChanged(
                    run_id="bbnew", stage="quick-check", stage_kind="validation",
                    state="waiting", service="metrics_collector",
                    inputs={
                        "dataset": "holdout", "gates": gates, "run_id": "bbnew",
                        "job_id": "bbnew-quick-check", "metrics": ["accuracy", "val_loss"],
                        "repository": REPO, "ref": "refs/heads/main", "pipeline": "train",
                    },
                )
            )  # fmt: skip
            answer = await asyncio.wait_for(answers.get(), 15)
        finally:
            await listener.close()
    assert (answer.run_id, answer.stage, answer.baseline_run_id) == (
        "bbnew",
        "quick-check",
        "bbbest",
    )
    # accuracy from the baseline's own quick-check job; val_loss, which that job never logged,
    # from its best trial.
    assert answer.baseline == pytest.approx({"accuracy": 0.88, "val_loss": 0.20})
    assert "quick-check job bbbest-quick-check" in answer.reason
    assert "best trial bbbest-trial-1" in answer.reason
    # The scheduler's gates on the right side of the baseline pass, on the wrong side fail.
    passing = evaluate_gates(
        gates, {"accuracy": {"last": 0.875}, "val_loss": {"last": 0.29}}, answer.baseline
    )
    assert all(r.passed for r in passing), passing
    failing = evaluate_gates(
        gates, {"accuracy": {"last": 0.865}, "val_loss": {"last": 0.31}}, answer.baseline
    )
    assert [r.passed for r in failing] == [False, False]
    assert "baseline=0.88" in failing[0].detail
