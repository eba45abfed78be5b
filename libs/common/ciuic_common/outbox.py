"""The transactional outbox: an event is published if and only if its transaction committed.

`Outbox.add(conn, event)` writes the event into `<schema>.outbox` inside the caller's
transaction and notifies the relay (PostgreSQL delivers the NOTIFY only on commit). The relay
publishes rows in order with `Nats-Msg-Id` = `event_id` and deletes them once JetStream has
acknowledged them. If the process dies after the commit, the row is still there and the next
relay publishes it; if it dies after the publish but before the delete, the row is published
again and JetStream drops the duplicate (same message id, inside the stream's duplicate window).
Relays of several replicas share the table safely (`FOR UPDATE SKIP LOCKED`); each publishes
its batches in order, but batches of different replicas may interleave. An event NATS can never
accept (over its maximum payload) is moved to `outbox_failed` with the error, loudly, rather
than block every event behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import asyncpg
import nats.errors
from prometheus_client import Counter, Gauge

from ciuic_common.bus import Bus
from ciuic_common.db import Connection, Database
from ciuic_common.events import STREAMS, Event
from ciuic_common.logging import get_logger

__all__ = ["Outbox", "OutboxRelay"]

log = get_logger(__name__)

RELAYED = Counter("ciuic_outbox_relayed_total", "Outbox rows published", ["schema"])
PENDING = Gauge("ciuic_outbox_pending", "Outbox rows seen waiting at the last pass", ["schema"])


def _channel(schema: str) -> str:
    return f"ciuic_outbox_{schema}"


class Outbox:
    """Writes events into a service's outbox table, inside the caller's transaction."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self._insert = (
            f'INSERT INTO "{schema}".outbox (event_id, event_name, subject, stream, payload)'
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING"
        )

    async def add(self, conn: Connection, *events: Event) -> None:
        """Stage `events` for publishing once the current transaction commits."""
        if not conn.is_in_transaction():
            raise RuntimeError("Outbox.add must run inside the transaction it belongs to")
        await conn.executemany(
            self._insert,
            [
                (
                    e.event_id,
                    e.name,
                    e.subject_for(),
                    e.stream.name if e.stream else None,
                    e.to_bytes(),
                )
                for e in events
            ],
        )
        await conn.execute("SELECT pg_notify($1, '')", _channel(self.schema))


class OutboxRelay:
    """Publishes committed outbox rows to the bus, in order, and deletes them on ack."""

    def __init__(
        self,
        db: Database,
        bus: Bus,
        *,
        batch_size: int = 256,
        poll_interval: float = 1.0,
    ) -> None:
        self.db = db
        self.bus = bus
        self.schema = db.schema
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()
        q = f'"{self.schema}".outbox'
        self._select = (
            f"SELECT event_id, event_name, subject, stream, payload FROM {q}"
            " ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED"
        )
        self._delete = f"DELETE FROM {q} WHERE event_id = ANY($1::text[])"

    async def run(self) -> None:
        """Relay until cancelled: on every commit notification, and every `poll_interval`."""
        async with self.db.connection() as listener:
            await listener.add_listener(_channel(self.schema), self._on_notify)
            try:
                while True:
                    self._wake.clear()
                    try:
                        await self.drain()
                    except (
                        OSError,
                        TimeoutError,
                        asyncpg.PostgresError,
                        asyncpg.InterfaceError,
                        nats.errors.Error,
                    ) as exc:
                        # NATS or PostgreSQL is away for a moment; rows stay and we try again.
                        log.warning("outbox_relay_failed", schema=self.schema, error=repr(exc))
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            finally:
                with contextlib.suppress(Exception):
                    await listener.remove_listener(_channel(self.schema), self._on_notify)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def drain(self) -> int:
        """Publish every committed row now; returns how many were published."""
        total = 0
        while True:
            async with self.db.transaction() as conn:
                rows = await conn.fetch(self._select, self.batch_size)
                PENDING.labels(self.schema).set(len(rows))
                if not rows:
                    return total
                try:
                    await self._publish(rows)
                except nats.errors.MaxPayloadError:
                    await self._publish_one_by_one(conn, rows)
                await conn.execute(self._delete, [r["event_id"] for r in rows])
            RELAYED.labels(self.schema).inc(len(rows))
            total += len(rows)

    async def _publish_one_by_one(self, conn: Connection, rows: Sequence[asyncpg.Record]) -> None:
        """Publish what can be; park an event NATS will never take, rather than block the rest."""
        for row in rows:
            try:
                await self._publish([row])
            except nats.errors.MaxPayloadError as exc:
                log.error(
                    "outbox_event_unpublishable", schema=self.schema, event_id=row["event_id"],
                    event_name=row["event_name"], bytes=len(row["payload"]), error=repr(exc),
                )  # fmt: skip
                await conn.execute(
                    f'INSERT INTO "{self.schema}".outbox_failed'
                    " (event_id, event_name, subject, stream, payload, created_at, error)"
                    " SELECT event_id, event_name, subject, stream, payload, created_at, $2"
                    f' FROM "{self.schema}".outbox WHERE event_id = $1'
                    " ON CONFLICT (event_id) DO NOTHING",
                    row["event_id"], repr(exc),
                )  # fmt: skip

    async def _publish(self, rows: Sequence[asyncpg.Record]) -> None:
        # Pipelined: all publishes go out on the one connection in order, then we await the acks.
        await asyncio.gather(
            *(
                self.bus.publish_raw(
                    r["subject"],
                    r["payload"],
                    r["event_id"],
                    STREAMS[r["stream"]] if r["stream"] else None,
                    r["event_name"],
                )
                for r in rows
            )
        )
