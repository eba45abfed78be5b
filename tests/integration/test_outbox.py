"""The outbox publishes an event if and only if its transaction committed — also when the
publishing process dies at the worst moment."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap

import nats
import pytest

from ciuic_common.bus import Bus
from ciuic_common.db import Database
from ciuic_common.events import RunFinished
from ciuic_common.outbox import Outbox, OutboxRelay

pytestmark = [pytest.mark.nats, pytest.mark.postgres]

SCHEMA = "svc"

# A child process that does the work of a service and is then killed with SIGKILL.
CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from ciuic_common.bus import Bus
    from ciuic_common.db import Database
    from ciuic_common.events import RunFinished
    from ciuic_common.outbox import Outbox, OutboxRelay

    mode, db_url, nats_url, run_id = sys.argv[1:]

    class DiesAfterPublish(OutboxRelay):
        async def _publish(self, rows):
            await super()._publish(rows)
            os.kill(os.getpid(), signal.SIGKILL)  # published, row not yet deleted

    async def main():
        db = Database(db_url, "svc")
        await db.connect()
        await db.migrate()
        async with db.transaction() as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS runs (id text PRIMARY KEY)")
            await tx.execute("INSERT INTO runs VALUES ($1)", run_id)
            event = RunFinished(event_id=run_id, run_id=run_id, outcome="succeeded")
            await Outbox("svc").add(tx, event)
        if mode == "after-commit":
            os.kill(os.getpid(), signal.SIGKILL)  # committed, nothing published
        bus = Bus(nats_url, name="child")
        await bus.connect()
        await DiesAfterPublish(db, bus).drain()

    asyncio.run(main())
    """
)


def run_child(mode: str, database_url: str, nats_url: str, run_id: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, database_url, nats_url, run_id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


async def received(nats_url: str, subject: str, wait: float = 1.0) -> list[bytes]:
    """Every message stored on `subject`, read back through a fresh consumer."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(subject, ordered_consumer=True)
        out = []
        while True:
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                return out
            out.append(msg.data)
    finally:
        await nc.close()


async def relay_everything(database_url: str, nats_url: str) -> None:
    db = Database(database_url, SCHEMA)
    bus = Bus(nats_url, name="relay")
    await db.connect()
    await bus.connect()
    try:
        await OutboxRelay(db, bus).drain()
        rows = await db.fetch("SELECT * FROM svc.outbox")
        assert rows == [], "the relay deletes what JetStream acknowledged"
    finally:
        await bus.close()
        await db.close()


@pytest.mark.parametrize("mode", ["after-commit", "after-publish"])
async def test_event_arrives_exactly_once_when_the_publisher_is_killed(
    mode: str, database_url: str, nats_url: str
) -> None:
    run_id = f"run-{mode}"
    await asyncio.to_thread(run_child, mode, database_url, nats_url, run_id)

    await relay_everything(database_url, nats_url)

    messages = await received(nats_url, "ciuic.run.finished")
    assert [RunFinished.from_bytes(m).run_id for m in messages] == [run_id]


async def test_event_is_not_published_when_its_transaction_rolls_back(
    database_url: str, nats_url: str
) -> None:
    db = Database(database_url, SCHEMA)
    await db.connect()
    await db.migrate()

    async def commit_then_change_mind() -> None:
        async with db.transaction() as tx:
            await Outbox(SCHEMA).add(tx, RunFinished(run_id="ghost", outcome="failed"))
            raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError, match="changed my mind"):
        await commit_then_change_mind()
    await db.close()

    await relay_everything(database_url, nats_url)

    assert await received(nats_url, "ciuic.run.finished") == []


async def test_the_same_event_published_twice_is_stored_once(
    database_url: str, nats_url: str
) -> None:
    db = Database(database_url, SCHEMA)
    await db.connect()
    await db.migrate()
    event = RunFinished(run_id="twice", outcome="succeeded")
    for _ in range(2):  # e.g. a handler redelivered after it had already written its outbox row
        async with db.transaction() as tx:
            await Outbox(SCHEMA).add(tx, event)
        await relay_everything(database_url, nats_url)
    bus = Bus(nats_url, name="direct")
    await bus.connect()
    assert await bus.publish(event) is False, "JetStream reports the duplicate"
    await bus.close()
    await db.close()

    messages = await received(nats_url, "ciuic.run.finished")
    assert [RunFinished.from_bytes(m).event_id for m in messages] == [event.event_id]


async def test_relay_publishes_committed_events_as_they_commit(
    database_url: str, nats_url: str
) -> None:
    db = Database(database_url, SCHEMA)
    bus = Bus(nats_url, name="live")
    await db.connect()
    await db.migrate()
    await bus.connect()
    got: asyncio.Queue[RunFinished] = asyncio.Queue()

    async def on_finished(event: RunFinished) -> None:
        await got.put(event)

    bus.subscribe(RunFinished, on_finished, durable="watcher")
    await bus.start()
    relay = asyncio.create_task(OutboxRelay(db, bus, poll_interval=30).run())
    try:
        for i in range(3):
            async with db.transaction() as tx:
                await Outbox(SCHEMA).add(tx, RunFinished(run_id=f"r{i}", outcome="succeeded"))
        # poll_interval is 30 s: arriving within 10 s means the commit's NOTIFY woke the relay
        runs = [(await asyncio.wait_for(got.get(), 10)).run_id for _ in range(3)]
        assert runs == ["r0", "r1", "r2"]
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
        await bus.close()
        await db.close()


async def test_an_event_nats_cannot_take_is_parked_and_does_not_block_the_rest(
    database_url: str, nats_url: str
) -> None:
    db = Database(database_url, SCHEMA)
    await db.connect()
    await db.migrate()
    huge = RunFinished(run_id="huge", outcome="failed", reason="x" * (2 * 1024 * 1024))
    after = RunFinished(run_id="after", outcome="succeeded")
    async with db.transaction() as tx:
        await Outbox(SCHEMA).add(tx, huge, after)
    await db.close()

    await relay_everything(database_url, nats_url)

    messages = await received(nats_url, "ciuic.run.finished")
    assert [RunFinished.from_bytes(m).run_id for m in messages] == ["after"]
    db = Database(database_url, SCHEMA)
    await db.connect()
    parked = await db.fetch("SELECT event_id, error FROM svc.outbox_failed")
    await db.close()
    assert [r["event_id"] for r in parked] == [huge.event_id]
    assert "MaxPayload" in parked[0]["error"]
