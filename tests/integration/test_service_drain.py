"""The runtime in one process: handlers in flight finish before the service stops, and what a
handler commits through the outbox is published by the service's relay."""

from __future__ import annotations

import asyncio

import nats
import pytest

from ciuic_common.events import RunCreated, RunFinished
from ciuic_common.service import Service
from ciuic_common.settings import ServiceSettings

pytestmark = [pytest.mark.nats, pytest.mark.postgres]


def settings(nats_url: str, database_url: str) -> ServiceSettings:
    return ServiceSettings(
        nats_url=nats_url, database_url=database_url, grpc_port=0, metrics_port=0
    )


async def test_a_handler_in_flight_finishes_and_is_acked_before_the_service_stops(
    nats_url: str, database_url: str
) -> None:
    service = Service("drainer", settings(nats_url, database_url), uses=("nats", "postgres"))
    started, finished = asyncio.Event(), []

    async def slow(event: RunCreated) -> None:
        started.set()
        await asyncio.sleep(1.0)
        finished.append(event.run_id)

    service.subscribe(RunCreated, slow, durable="drainer-slow")
    running = asyncio.create_task(service.run())
    await asyncio.wait_for(service.wait_ready(), 30)
    await service.publish(RunCreated(run_id="r1", repository="repo", commit="c", ref="main"))
    await asyncio.wait_for(started.wait(), 10)

    service.request_stop()  # what SIGTERM does
    await asyncio.wait_for(running, 30)
    assert finished == ["r1"]

    nc = await nats.connect(nats_url)
    info = await nc.jetstream().consumer_info("PIPELINES", "drainer-slow")
    await nc.close()
    assert info.num_ack_pending == 0, "acked, so no replica will run it again"
    assert info.num_pending == 0


async def test_events_a_handler_commits_through_the_outbox_are_published(
    nats_url: str, database_url: str
) -> None:
    service = Service("relayer", settings(nats_url, database_url), uses=("nats", "postgres"))
    assert service.db is not None
    assert service.outbox is not None
    db, outbox = service.db, service.outbox
    seen: asyncio.Queue[RunFinished] = asyncio.Queue()

    async def on_created(event: RunCreated) -> None:
        async with db.transaction() as tx:
            await outbox.add(tx, RunFinished(run_id=event.run_id, outcome="succeeded"))

    async def on_finished(event: RunFinished) -> None:
        await seen.put(event)

    service.subscribe(RunCreated, on_created)
    service.subscribe(RunFinished, on_finished)
    running = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.wait_ready(), 30)
        await service.publish(RunCreated(run_id="r2", repository="repo", commit="c", ref="main"))
        assert (await asyncio.wait_for(seen.get(), 10)).run_id == "r2"
    finally:
        service.request_stop()
        await asyncio.wait_for(running, 30)
