"""The bus contract against a real NATS server: streams, message ids, redelivery, dead letters."""

from __future__ import annotations

import asyncio
import itertools
import time

import nats
import pytest

from ciuic_common.bus import Bus, RetryPolicy, ensure_streams
from ciuic_common.events import STREAMS, JobStop, RunFinished

pytestmark = pytest.mark.nats


@pytest.fixture
async def bus(nats_url: str) -> Bus:
    bus = Bus(nats_url, name="test")
    await bus.connect()
    yield bus
    await bus.close()


async def test_streams_are_created_idempotently_and_updated_in_place(bus: Bus) -> None:
    await ensure_streams(bus.js)
    await ensure_streams(bus.js)  # second start: nothing to do
    names = {info.config.name for info in await bus.js.streams_info()}
    assert names == set(STREAMS)

    # An operator's stream with old limits is brought to the declared configuration.
    await bus.js.update_stream(name="METRICS", subjects=["ciuic.metrics.>"], max_age=60.0)
    await ensure_streams(bus.js)
    info = await bus.js.stream_info("METRICS")
    assert info.config.max_age == STREAMS["METRICS"].max_age


async def test_every_publish_carries_the_event_id_as_nats_msg_id(bus: Bus) -> None:
    event = JobStop(job_id="job-7", requested_by="alice", reason="diverged")
    assert await bus.publish(event) is True
    msg = await bus.js.get_last_msg("JOBS", "ciuic.job.stop.job-7")
    assert msg.headers is not None
    assert msg.headers["Nats-Msg-Id"] == event.event_id
    assert JobStop.from_bytes(msg.data) == event


async def test_failing_message_is_dead_lettered_without_blocking_the_next(bus: Bus) -> None:
    attempts: list[float] = []
    handled: asyncio.Queue[str] = asyncio.Queue()

    async def handler(event: RunFinished) -> None:
        if event.run_id == "poison":
            attempts.append(time.monotonic())
            raise ValueError("cannot handle this one")
        await handled.put(event.run_id)

    retry = RetryPolicy(max_deliver=3, backoff=(0.3, 0.6))
    bus.subscribe(RunFinished, handler, durable="picky", retry=retry)
    await bus.start()
    await bus.publish(RunFinished(run_id="poison", outcome="failed"))
    await bus.publish(RunFinished(run_id="healthy", outcome="succeeded"))

    # The next message is handled while the poison one waits for its redelivery.
    assert await asyncio.wait_for(handled.get(), 5) == "healthy"
    assert len(attempts) < retry.max_deliver

    dead = await _next_dead_letter(bus, wait=10)
    assert len(attempts) == retry.max_deliver
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.25, f"backoff not applied: {gaps}"
    assert gaps[1] >= 0.5, f"backoff not applied: {gaps}"
    assert dead.subject == "ciuic.deadletter.ciuic.run.finished"
    assert dead.headers["Ciuic-Consumer"] == "picky"
    assert dead.headers["Ciuic-Deliveries"] == "3"
    assert "cannot handle this one" in dead.headers["Ciuic-Error"]
    assert RunFinished.from_bytes(dead.data).run_id == "poison"

    # Nothing is redelivered after the dead letter.
    await asyncio.sleep(1.0)
    assert len(attempts) == retry.max_deliver


async def test_undecodable_message_is_dead_lettered_at_once(bus: Bus) -> None:
    calls = []

    async def handler(event: RunFinished) -> None:
        calls.append(event)

    bus.subscribe(RunFinished, handler, durable="strict")
    await bus.start()
    await bus.js.publish("ciuic.run.finished", b"{not json", headers={"Nats-Msg-Id": "garbage"})
    dead = await _next_dead_letter(bus, wait=10)
    assert dead.headers["Ciuic-Deliveries"] == "1"
    assert "undecodable" in dead.headers["Ciuic-Error"]
    assert calls == []


async def test_replicas_sharing_a_durable_consumer_split_the_messages(nats_url: str) -> None:
    seen: dict[str, list[str]] = {"a": [], "b": []}
    buses = []
    for replica in seen:
        bus = Bus(nats_url, name=f"replica-{replica}")

        async def handler(event: RunFinished, replica: str = replica) -> None:
            seen[replica].append(event.run_id)
            await asyncio.sleep(0.01)

        bus.subscribe(RunFinished, handler, durable="shared")
        await bus.connect()
        await bus.start()
        buses.append(bus)
    for i in range(40):
        await buses[0].publish(RunFinished(run_id=f"r{i}", outcome="succeeded"))
    deadline = time.monotonic() + 10
    while len(seen["a"]) + len(seen["b"]) < 40 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    for bus in buses:
        await bus.close()
    handled = seen["a"] + seen["b"]
    assert sorted(handled) == sorted(f"r{i}" for i in range(40)), "each message exactly once"


async def _next_dead_letter(bus: Bus, wait: float) -> nats.aio.msg.Msg:
    sub = await bus.js.subscribe("ciuic.deadletter.>", ordered_consumer=True)
    try:
        return await sub.next_msg(timeout=wait)
    finally:
        await sub.unsubscribe()
