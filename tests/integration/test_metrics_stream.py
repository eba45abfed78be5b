"""StreamMetrics against the real metrics collector (real NATS and PostgreSQL): where a stream
starts (`after_step`, `FROM_NOW`), and that open streams end at once when the service drains."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from ciuic_common.bus import Bus
from ciuic_common.db import Database
from ciuic_common.events import MetricPoint, MetricsBatch
from ciuic_common.outbox import Outbox
from ciuic_common.proto import metrics_collector_pb2 as pb
from ciuic_common.proto import metrics_collector_pb2_grpc
from ciuic_common.rpc import GrpcServer, channel
from ciuic_common.service import Service
from ciuic_metrics_collector.api import FROM_NOW, MetricsApi
from ciuic_metrics_collector.history import History
from ciuic_metrics_collector.service import INFO, MetricsCollectorSettings, build
from ciuic_metrics_collector.streams import Feed

pytestmark = [pytest.mark.nats, pytest.mark.postgres]

T0 = datetime(2026, 12, 5, tzinfo=UTC)
WAIT = 10.0  # seconds any one wait of these tests may take

Stub = metrics_collector_pb2_grpc.MetricsServiceStub
#: Steps seen per (job, key).
Seen = dict[tuple[str, str], list[int]]


@contextlib.asynccontextmanager
async def collector(
    nats_url: str, database_url: str, **overrides: Any
) -> AsyncIterator[tuple[Service, Stub, Bus]]:
    settings = MetricsCollectorSettings(
        nats_url=nats_url, database_url=database_url, grpc_port=0, metrics_port=0,
        dashboard_port=0, **overrides,
    )  # fmt: skip
    service = build(settings)
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.wait_ready(), 30)
    bus = Bus(nats_url, name="test-publisher")
    await bus.connect()
    try:
        async with channel(f"127.0.0.1:{service.grpc_port}", timeout=None) as ch:
            yield service, metrics_collector_pb2_grpc.MetricsServiceStub(ch), bus
    finally:
        await bus.close()
        service.request_stop()
        await asyncio.wait_for(task, 30)


def batch(run_id: str, job: str, points: dict[str, list[tuple[int, float]]]) -> MetricsBatch:
    return MetricsBatch.of(
        run_id=run_id,
        job_id=f"{run_id}-{job}",
        points=[
            MetricPoint(key=key, step=step, value=value, timestamp=T0 + timedelta(seconds=step))
            for key, series in points.items()
            for step, value in series
        ],
    )


async def until(check: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


async def stored(api: Stub, run_id: str, count: int) -> None:
    """Until the collector holds `count` points of the run."""

    async def enough() -> bool:
        try:
            answer = await api.GetSummaries(pb.GetSummariesRequest(run_ids=[run_id]))
        except grpc.aio.AioRpcError:  # NOT_FOUND until the run's first batch is stored
            return False
        return bool(sum(s.count for s in answer.summaries) == count)

    await until(enough)


async def read_until(stream: Any, seen: Seen, wanted: Seen) -> None:
    """Collect the stream's steps into `seen` until every series in `wanted` has its steps."""

    def done() -> bool:
        return all(len(seen.get(k, [])) >= len(v) for k, v in wanted.items())

    async with asyncio.timeout(WAIT):
        while not done():
            update = await stream.read()
            assert update is not grpc.aio.EOF, "the stream ended"
            for s in update.series:
                job = s.job_id.partition("-")[2]
                seen.setdefault((job, s.key), []).extend(p.step for p in s.points)


async def end_of(stream: Any, within: float) -> grpc.aio.AioRpcError:
    """The error that ends `stream` (read to its end within `within` seconds)."""
    async with asyncio.timeout(within):
        try:
            async for _ in stream:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc
    raise AssertionError("the stream ended without an error")


async def test_a_stream_from_now_starts_old_series_at_their_end_and_new_ones_at_their_start(
    nats_url: str, database_url: str
) -> None:
    run = "fromnow"
    async with collector(nats_url, database_url) as (_, api, bus):
        await bus.publish(batch(run, "trial-0", {"loss": [(s, 1.0 / (s + 1)) for s in range(5)]}))
        await stored(api, run, 5)
        from_now = api.StreamMetrics(pb.StreamMetricsRequest(run_id=run, after_step=FROM_NOW))
        after_two = api.StreamMetrics(pb.StreamMetricsRequest(run_id=run, after_step=2))
        # The initial metadata says the starting points are fixed: what follows is new.
        for stream in (from_now, after_two):
            await asyncio.wait_for(stream.initial_metadata(), WAIT)

        await bus.publish(batch(run, "trial-0", {"loss": [(5, 0.2), (6, 0.1)]}))
        # A trial that starts later, and a new metric of the running trial: whole.
        await bus.publish(batch(run, "trial-1", {"loss": [(0, 3.0), (1, 2.0), (2, 1.5)]}))
        await bus.publish(batch(run, "trial-0", {"accuracy": [(0, 0.1), (1, 0.2)]}))

        new: Seen = {}
        wanted = {
            ("trial-0", "loss"): [5, 6],
            ("trial-1", "loss"): [0, 1, 2],
            ("trial-0", "accuracy"): [0, 1],
        }
        await read_until(from_now, new, wanted)
        assert new == wanted

        # A step keeps its meaning: every series after it, stored points replayed first; the
        # new trial's steps 0-2 and the new metric's 0-1 are not after step 2.
        old: Seen = {}
        await read_until(after_two, old, {("trial-0", "loss"): [3, 4, 5, 6]})
        assert old == {("trial-0", "loss"): [3, 4, 5, 6]}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                stray = await after_two.read()
                pytest.fail(f"a point at or before step 2 was streamed: {stray}")
        for stream in (from_now, after_two):
            stream.cancel()


async def test_close_ends_open_streams_within_a_second_and_refuses_new_ones(
    nats_url: str, database_url: str
) -> None:
    run = "closing"
    async with collector(nats_url, database_url) as (_, stub, bus):
        await bus.publish(batch(run, "trial-0", {"loss": [(0, 1.0)]}))
        await stored(stub, run, 1)
        # A second replica's API over the same database, so the test holds its servicer.
        db = Database(database_url, INFO.name)
        await db.connect()
        api = MetricsApi(db, Feed(db), History(db, Outbox(INFO.name)))
        server = GrpcServer("replica", "127.0.0.1", 0)
        server.add(metrics_collector_pb2_grpc.add_MetricsServiceServicer_to_server, api, "x")
        port = await server.start()
        try:
            async with channel(f"127.0.0.1:{port}", timeout=None) as ch:
                replica = metrics_collector_pb2_grpc.MetricsServiceStub(ch)
                streams = [
                    replica.StreamMetrics(pb.StreamMetricsRequest(run_id=run, after_step=step))
                    for step in (FROM_NOW, 0)
                ]
                for stream in streams:
                    await asyncio.wait_for(stream.initial_metadata(), WAIT)
                started = time.monotonic()
                await api.close()
                for stream in streams:
                    ended = await end_of(stream, within=1.0)
                    assert ended.code() == grpc.StatusCode.UNAVAILABLE
                    assert "shutting down" in (ended.details() or "")
                assert time.monotonic() - started < 1.0
                late = replica.StreamMetrics(pb.StreamMetricsRequest(run_id=run))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await asyncio.wait_for(late.read(), WAIT)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)
            await db.close()


async def test_a_draining_collector_ends_its_open_streams_at_once(
    nats_url: str, database_url: str
) -> None:
    run = "draining"
    async with collector(nats_url, database_url, shutdown_grace=6.0) as (service, api, bus):
        await bus.publish(batch(run, "trial-0", {"loss": [(0, 1.0)]}))
        await stored(api, run, 1)
        stream = api.StreamMetrics(pb.StreamMetricsRequest(run_id=run, after_step=FROM_NOW))
        await asyncio.wait_for(stream.initial_metadata(), WAIT)
        started = time.monotonic()
        service.request_stop()  # what SIGTERM does
        ended = await end_of(stream, within=WAIT)
        assert time.monotonic() - started < 3.0, "the stream held the drain"
        assert ended.code() == grpc.StatusCode.UNAVAILABLE
