"""The bus: FastStream's NATS broker with ciuic's contract on top.

- streams from `ciuic_common.events.STREAMS` are created (or updated) idempotently at connect;
- every publish sends `Nats-Msg-Id` = `event_id`, so JetStream drops a duplicate publish;
- subscribers are durable pull consumers with explicit acks; a failing handler is redelivered
  with backoff, and after `max_deliver` attempts the message goes to the dead-letter subject
  `ciuic.deadletter.<subject>` with the error in its headers, without holding up the messages
  behind it. A message that cannot even be decoded goes there at once.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from faststream import AckPolicy
from faststream.nats import ConsumerConfig, JStream, NatsBroker, NatsMessage, PullSub
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, DiscardPolicy, StorageType, StreamConfig
from prometheus_client import Counter, Histogram
from pydantic import ValidationError

from ciuic_common.errors import Unavailable
from ciuic_common.events import DEAD_LETTER_PREFIX, STREAMS, Event, StreamSpec
from ciuic_common.logging import get_logger

__all__ = ["Bus", "Handler", "RetryPolicy", "ensure_streams"]

log = get_logger(__name__)

E = TypeVar("E", bound=Event)
Handler = Callable[[E], Awaitable[None]]

PUBLISHED = Counter("ciuic_bus_published_total", "Events published", ["event"])
HANDLED = Counter("ciuic_bus_handled_total", "Messages handled", ["event", "consumer", "outcome"])
HANDLE_SECONDS = Histogram(
    "ciuic_bus_handle_seconds", "Time spent in event handlers", ["event", "consumer"]
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failing message is tried, and how long to wait between tries."""

    max_deliver: int = 5
    backoff: tuple[float, ...] = (1.0, 5.0, 15.0, 30.0)
    #: Seconds a handler may run before JetStream assumes it died and redelivers.
    ack_wait: float = 60.0

    def delay(self, delivered: int) -> float:
        """The wait before delivery number `delivered + 1`."""
        return self.backoff[min(delivered, len(self.backoff)) - 1] if self.backoff else 0.0


def stream_config(spec: StreamSpec) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        description=spec.description,
        storage=StorageType.FILE,
        max_age=spec.max_age,
        max_bytes=spec.max_bytes,
        discard=DiscardPolicy.OLD,
        duplicate_window=spec.duplicate_window,
    )


async def ensure_streams(js: JetStreamContext, specs: Sequence[StreamSpec] = ()) -> None:
    """Create every stream, or bring an existing one to its declared configuration."""
    for spec in specs or tuple(STREAMS.values()):
        config = stream_config(spec)
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            # 10058: the stream exists with another configuration (e.g. new limits).
            if exc.err_code != 10058:
                raise
            await js.update_stream(config)


def dead_letter_subject(subject: str) -> str:
    return f"{DEAD_LETTER_PREFIX}.{subject}"


class Bus:
    """One service's connection to NATS: publish events, subscribe handlers."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        connect_timeout: float = 10.0,
        publish_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.publish_timeout = publish_timeout
        self.broker = NatsBroker(
            url,
            name=name,
            connect_timeout=round(connect_timeout),
            max_reconnect_attempts=-1,  # keep trying through a NATS restart
            reconnect_time_wait=1,
            logger=None,
        )
        self._started = False

    @property
    def connection(self) -> Client:
        return self.broker.connection

    @property
    def js(self) -> JetStreamContext:
        return self.connection.jetstream(timeout=self.publish_timeout)

    async def connect(self) -> None:
        """Connect and ensure every stream exists."""
        try:
            await self.broker.connect()
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise Unavailable(f"cannot connect to NATS for {self.name}: {exc!r}") from exc
        await ensure_streams(self.js)

    async def start(self) -> None:
        """Start consuming on every subscription added so far."""
        await self.broker.start()
        self._started = True

    async def stop_consuming(self) -> None:
        """Stop taking new messages; handlers already running finish first."""
        for subscriber in self.broker.subscribers:
            await subscriber.stop()

    async def close(self) -> None:
        """Drain in-flight work and disconnect."""
        await self.broker.stop()
        self._started = False

    async def publish(self, event: Event) -> bool:
        """Publish `event`; True if JetStream stored it, False if it was a duplicate.

        Plain-NATS events (no stream) are fire-and-forget and return True.
        """
        return await self.publish_raw(
            event.subject_for(), event.to_bytes(), event.event_id, event.stream, event.name
        )

    async def publish_raw(
        self,
        subject: str,
        payload: bytes,
        event_id: str,
        stream: StreamSpec | None,
        name: str = "",
        headers: dict[str, str] | None = None,
    ) -> bool:
        """Publish bytes already serialised (the outbox relay's path)."""
        all_headers = {"Nats-Msg-Id": event_id, "Ciuic-Event": name, **(headers or {})}
        if stream is None:
            await self.connection.publish(subject, payload, headers=all_headers)
            return True
        ack = await self.js.publish(
            subject, payload, timeout=self.publish_timeout, stream=stream.name, headers=all_headers
        )
        PUBLISHED.labels(name or subject).inc()
        return not ack.duplicate

    def subscribe(
        self,
        event_type: type[E],
        handler: Handler[E],
        *,
        durable: str,
        keys: dict[str, str] | None = None,
        retry: RetryPolicy | None = None,
        concurrency: int = 1,
        deliver_new_only: bool = False,
    ) -> None:
        """Call `handler` for every `event_type` on a durable consumer named `durable`.

        Replicas of a service share the durable name and so split the messages between them.
        """
        retry = retry or RetryPolicy()
        subject = event_type.wildcard_subject(**(keys or {}))
        if event_type.stream is None:
            self._subscribe_core(event_type, handler, subject)
            return
        consumer = f"{durable}"
        config = ConsumerConfig(
            durable_name=consumer,
            ack_wait=retry.ack_wait,
            # We count deliveries ourselves and dead-letter; the server never gives up silently.
            max_deliver=-1,
            max_ack_pending=max(64, concurrency * 4),
            deliver_policy=DeliverPolicy.NEW if deliver_new_only else DeliverPolicy.ALL,
            filter_subject=subject,
        )
        name = event_type.name

        async def consume(msg: NatsMessage) -> None:
            raw = msg.raw_message
            delivered = raw.metadata.num_delivered
            if delivered > retry.max_deliver:
                # Earlier deliveries timed out without an answer (the handler hung or died).
                await self._dead_letter(raw, consumer, delivered, "no ack after every delivery")
                HANDLED.labels(name, consumer, "dead_letter").inc()
                return
            try:
                event = event_type.from_bytes(raw.data)
            except ValidationError as exc:
                await self._dead_letter(raw, consumer, delivered, f"undecodable: {exc}")
                HANDLED.labels(name, consumer, "dead_letter").inc()
                return
            started = time.perf_counter()
            try:
                await handler(event)
            except Exception as exc:
                HANDLE_SECONDS.labels(name, consumer).observe(time.perf_counter() - started)
                if delivered >= retry.max_deliver:
                    log.error(
                        "event_dead_lettered", event_name=name, event_id=event.event_id,
                        consumer=consumer, deliveries=delivered, error=repr(exc),
                    )  # fmt: skip
                    await self._dead_letter(raw, consumer, delivered, repr(exc))
                    HANDLED.labels(name, consumer, "dead_letter").inc()
                else:
                    log.warning(
                        "event_handler_failed", event_name=name, event_id=event.event_id,
                        consumer=consumer, delivery=delivered, error=repr(exc),
                    )  # fmt: skip
                    await raw.nak(delay=retry.delay(delivered))
                    HANDLED.labels(name, consumer, "retry").inc()
                return
            HANDLE_SECONDS.labels(name, consumer).observe(time.perf_counter() - started)
            await raw.ack()
            HANDLED.labels(name, consumer, "ok").inc()

        self.broker.subscriber(
            subject,
            stream=JStream(event_type.stream.name, declare=False),
            durable=consumer,
            config=config,
            pull_sub=PullSub(batch_size=max(64, concurrency), timeout=5.0),
            ack_policy=AckPolicy.MANUAL,
            max_workers=concurrency if concurrency > 1 else None,
        )(consume)

    def _subscribe_core(self, event_type: type[E], handler: Handler[E], subject: str) -> None:
        async def consume(msg: NatsMessage) -> None:
            try:
                event = event_type.from_bytes(msg.raw_message.data)
                await handler(event)
            except Exception as exc:
                # Plain NATS is fire-and-forget: nothing to redeliver; say so and go on.
                log.warning(
                    "core_message_dropped", subject=msg.raw_message.subject, error=repr(exc)
                )

        self.broker.subscriber(subject)(consume)

    async def _dead_letter(self, raw: Any, consumer: str, delivered: int, error: str) -> None:
        """Park the message where a person can look at it, then stop its redelivery."""
        original = raw.headers or {}
        msg_id = (
            original.get("Nats-Msg-Id") or f"{raw.metadata.stream}-{raw.metadata.sequence.stream}"
        )
        headers = {
            **original,
            "Nats-Msg-Id": f"{msg_id}:{consumer}:dead",
            "Ciuic-Error": error[:2000],
            "Ciuic-Consumer": consumer,
            "Ciuic-Deliveries": str(delivered),
            "Ciuic-Original-Subject": raw.subject,
        }
        await self.js.publish(
            dead_letter_subject(raw.subject), raw.data, headers=headers,
            stream=STREAMS["DEADLETTER"].name, timeout=self.publish_timeout,
        )  # fmt: skip
        await raw.term()
