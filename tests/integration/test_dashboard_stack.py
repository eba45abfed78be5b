"""The live dashboard against the real stack, in a real headless Chromium: the scheduler and the
metrics collector run in-process on real NATS and PostgreSQL, the run comes from a pipeline
request, points come as MetricsBatch events on the bus (as agents publish them), and the page
served by the metrics collector draws them live. A NaN point shows as a gap with a marker, a
trial that starts logging later appears whole, and a screenshot is saved (to
$CIUIC_TEST_ARTIFACTS, or the test's tmp_path; the path is printed)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from ciuic_common.bus import Bus
from ciuic_common.events import MetricPoint, MetricsBatch, PipelineRequested
from ciuic_common.pipeline import load_pipeline
from ciuic_common.proto import metrics_collector_pb2 as mpb
from ciuic_common.proto import metrics_collector_pb2_grpc, scheduler_pb2_grpc
from ciuic_common.proto import scheduler_pb2 as spb
from ciuic_common.rpc import channel
from ciuic_common.servers import free_port
from ciuic_common.service import Service
from ciuic_metrics_collector import service as metrics_collector
from ciuic_scheduler import service as scheduler
from tests.integration import test_dashboard as ui
from tests.integration.test_dashboard import chart, line, nonfinite_marks

# The browser, its page and where screenshots go, as the dashboard's own tests have them.
chromium, page, artifacts = ui.chromium, ui.page, ui.artifacts

pytestmark = [pytest.mark.slow, pytest.mark.nats, pytest.mark.postgres]

WAIT = 20.0  # seconds any one wait of this test may take
T0 = datetime(2026, 12, 5, tzinfo=UTC)
# Two trials of one GPU each; no agent runs them, so the run stays running while we log.
PIPELINE = """
training:
  gpus_per_node: 1
  hyperparameters:
    - {name: learning_rate, values: [0.001, 0.0001]}
"""


@dataclass
class Stack:
    url: str  # the dashboard
    bus: Bus
    metrics: metrics_collector_pb2_grpc.MetricsServiceStub
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub


@contextlib.asynccontextmanager
async def running(service: Service) -> AsyncIterator[Service]:
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.wait_ready(), 30)
    try:
        yield service
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)


async def until(probe: Callable[[], Awaitable[Any]], what: str, within: float = WAIT) -> Any:
    """Poll `probe` until it returns something truthy (gRPC errors count as not yet)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(grpc.aio.AioRpcError, aiohttp.ClientError):
            if found := await probe():
                return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


@pytest.fixture
async def stack(nats_url: str, database_url: str) -> AsyncIterator[Stack]:
    sched = scheduler.build(
        scheduler.SchedulerSettings(
            nats_url=nats_url, database_url=database_url, grpc_port=0, metrics_port=0,
            tick_interval=0.1, leader_ttl=1.5,
        )
    )  # fmt: skip
    async with running(sched):
        # The service does not tell its dashboard's bound port, so it gets a free one.
        dashboard_port = free_port()
        collector = metrics_collector.build(
            metrics_collector.MetricsCollectorSettings(
                nats_url=nats_url, database_url=database_url, grpc_port=0, metrics_port=0,
                dashboard_port=dashboard_port, scheduler_addr=f"127.0.0.1:{sched.grpc_port}",
                shutdown_grace=3.0,
            )
        )  # fmt: skip
        async with (
            running(collector),
            channel(f"127.0.0.1:{collector.grpc_port}") as metrics_channel,
            channel(f"127.0.0.1:{sched.grpc_port}") as scheduler_channel,
        ):
            bus = Bus(nats_url, name="test-agent")
            await bus.connect()
            try:
                yield Stack(
                    f"http://127.0.0.1:{dashboard_port}",
                    bus,
                    metrics_collector_pb2_grpc.MetricsServiceStub(metrics_channel),
                    scheduler_pb2_grpc.SchedulerServiceStub(scheduler_channel),
                )
            finally:
                await bus.close()


def batch(job_id: str, run_id: str, points: dict[str, list[tuple[int, float]]]) -> MetricsBatch:
    return MetricsBatch.of(
        run_id=run_id,
        job_id=job_id,
        points=[
            MetricPoint(key=key, step=step, value=value, timestamp=T0 + timedelta(seconds=step))
            for key, values in points.items()
            for step, value in values
        ],
    )


async def stored(stack: Stack, run_id: str, count: int) -> None:
    async def enough() -> bool:
        answer = await stack.metrics.GetSummaries(mpb.GetSummariesRequest(run_ids=[run_id]))
        return bool(sum(s.count for s in answer.summaries) == count)

    await until(enough, f"{count} points of {run_id} stored")


HAS_STEP = """([id, name, step]) => {
  const div = document.querySelector(`[data-chart="${id}"]`);
  const t = div && div.data && div.data.find((t) => t.name === name);
  return Boolean(t) && Array.from(t.x).includes(step);
}"""


async def test_a_point_published_on_the_bus_reaches_the_run_page_of_the_real_stack(
    stack: Stack, page: Any, artifacts: Path
) -> None:
    started = time.monotonic()
    await stack.bus.publish(
        PipelineRequested(
            repository="https://git.example.com/ml/tiny.git", commit="c0ffee" * 6 + "beef",
            ref="refs/heads/main", spec=load_pipeline(PIPELINE).model_dump(mode="json"),
        )
    )  # fmt: skip

    async def the_run() -> spb.Run | None:
        runs = await stack.scheduler.ListRuns(spb.ListRunsRequest())
        if not runs.runs:
            return None
        run = await stack.scheduler.GetRun(spb.GetRunRequest(run_id=runs.runs[0].id))
        return run if len([j for j in run.jobs if j.kind == "trial"]) == 2 else None

    run = await until(the_run, "the scheduler to create the run and its trials")
    assert run.state == "running"
    trial0, trial1 = sorted((j for j in run.jobs if j.kind == "trial"), key=lambda j: j.trial)
    # The trials share their stage's name; the page names them by index.
    one, two = f"trial-{trial0.trial}", f"trial-{trial1.trial}"
    await stack.bus.publish(
        batch(trial0.id, run.id, {
            "training_loss": [(0, 2.3), (1, 1.9), (2, 1.6), (3, math.nan), (4, 1.2), (5, 1.1)],
            "accuracy": [(s, 0.1 * s) for s in range(6)],
        })
    )  # fmt: skip
    await stored(stack, run.id, 12)

    await page.goto(f"{stack.url}/runs/{run.id[:8]}")
    await page.wait_for_function("() => ciuic.page && ciuic.page.live && ciuic.page.curvesLoaded")
    await page.wait_for_selector('[data-chart="train:training_loss"] .main-svg')
    loss = await chart(page, "train:training_loss")
    assert line(loss, one)["x"] == [0, 1, 2, 3, 4, 5]
    assert line(loss, one)["y"][3] is None  # the stored NaN: a gap with a marker
    assert nonfinite_marks(loss)["x"] == [3]

    # New points on the bus, a NaN among them, and the other trial's first points (a series
    # that appears after the page subscribed comes whole, from step 0).
    await stack.bus.publish(
        batch(trial0.id, run.id, {"training_loss": [(6, 0.95), (7, math.nan), (8, 0.9)]})
    )
    await stack.bus.publish(batch(trial1.id, run.id, {"training_loss": [(0, 2.4), (1, 2.1)]}))
    await page.wait_for_function(HAS_STEP, arg=["train:training_loss", one, 8])
    await page.wait_for_function(HAS_STEP, arg=["train:training_loss", two, 1])
    assert await page.evaluate("() => ciuic.page.events") >= 1, "drawn from the live stream"
    loss = await chart(page, "train:training_loss")
    first = line(loss, one)
    assert first["x"] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert first["y"][6:] == [pytest.approx(0.95), None, pytest.approx(0.9)]
    assert line(loss, two)["x"] == [0, 1]
    marks = nonfinite_marks(loss)
    assert marks["x"] == [3, 7]
    assert "NaN at step 7" in marks["text"][1]
    title = await page.text_content('[data-chart="train:training_loss"] .gtitle')
    assert title is not None
    assert "2 NaN/inf" in title

    shot = artifacts / "dashboard-stack-run.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"\n  real stack run page drawn live in {time.monotonic() - started:.1f} s")
