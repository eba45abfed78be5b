"""The bus: FastStream's NATS broker with ciuic's contract on top.

- streams from `ciuic_common.events.STREAMS` are created (or updated) idempotently at connect;
- every publish sends `Nats-Msg-Id` = `event_id`, so JetStream drops a duplicate publish;
- subscribers are durable JetStream pull consumers with explicit acks (run with nats-py
  directly; see `_PullConsumer`); a failing handler is redelivered
  with backoff, and after `max_deliver` attempts the message goes to the dead-letter subject
  `ciuic.deadletter.<subject>` with the error in its headers, without holding up the messages
  behind it. A message that cannot even be decoded goes there at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from faststream.nats import NatsBroker, NatsMessage
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)
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
        self.url = url
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self.broker = NatsBroker(
            url,
            name=name,
            connect_timeout=round(connect_timeout),
            max_reconnect_attempts=-1,  # keep trying through a NATS restart
            reconnect_time_wait=1,
            logger=None,
        )
        self._consumers: list[_PullConsumer] = []

    @property
    def connection(self) -> Client:
        return self.broker.connection

    @property
    def js(self) -> JetStreamContext:
        return self.connection.jetstream(timeout=self.publish_timeout)

    async def connect(self) -> None:
        """Connect and ensure every stream exists."""
        try:
            # Bounded: with endless reconnects on, nats-py would also retry a first connect forever.
            await asyncio.wait_for(self.broker.connect(), self.connect_timeout)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise Unavailable(
                f"cannot connect to NATS at {self.url} for {self.name} within "
                f"{self.connect_timeout:g}s ({exc!r}); check CIUIC_NATS_URL and that NATS runs"
            ) from exc
        await ensure_streams(self.js)

    async def start(self) -> None:
        """Start consuming on every subscription added so far."""
        await self.broker.start()
        for consumer in self._consumers:
            await consumer.start()

    async def stop_consuming(self) -> None:
        """Stop taking new messages; handlers already running finish first."""
        for consumer in self._consumers:
            await consumer.stop()
        for subscriber in self.broker.subscribers:
            await subscriber.stop()

    async def close(self) -> None:
        """Finish in-flight work and disconnect."""
        await self.stop_consuming()
        await self.broker.stop()

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
        gate: asyncio.Event | None = None,
    ) -> None:
        """Call `handler` for every `event_type` on a durable consumer named `durable`.

        Replicas of a service share the durable name and so split the messages between them.
        With a `gate`, the consumer fetches only while the gate is set (the active replica of a
        service with one leader); clearing it hands back what was prefetched. Add subscriptions
        before `start()`.
        """
        subject = event_type.wildcard_subject(**(keys or {}))
        if event_type.stream is None:
            self._subscribe_core(event_type, handler, subject)
            return
        self._consumers.append(
            _PullConsumer(
                self,
                event_type,
                handler,
                durable=durable,
                subject=subject,
                retry=retry or RetryPolicy(),
                concurrency=concurrency,
                deliver_new_only=deliver_new_only,
                gate=gate,
            )
        )

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

    async def dead_letter(self, raw: Msg, consumer: str, delivered: int, error: str) -> None:
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


class _PullConsumer:
    """One durable JetStream pull consumer feeding one handler.

    nats-py directly rather than FastStream's subscriber: measured on this machine, FastStream's
    per-message dependency injection caps a consumer near 2,000 messages/s where a plain pull
    loop handles about 9,000 (docs/benchmarks.md); the bus is on every service's hot path.
    """

    def __init__(
        self,
        bus: Bus,
        event_type: type[E],
        handler: Handler[E],
        *,
        durable: str,
        subject: str,
        retry: RetryPolicy,
        concurrency: int,
        deliver_new_only: bool,
        gate: asyncio.Event | None = None,
    ) -> None:
        assert event_type.stream is not None
        self.gate = gate
        self.bus = bus
        self.event_type: type[Event] = event_type
        self.handler: Handler[Any] = handler
        self.durable = durable
        self.stream = event_type.stream.name
        self.retry = retry
        self.concurrency = max(1, concurrency)
        # Enough prefetched to keep the handler busy, few enough to start within ack_wait.
        self.batch = min(64, self.concurrency * 16)
        self.config = ConsumerConfig(
            durable_name=durable,
            filter_subject=subject,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=retry.ack_wait,
            # We count deliveries ourselves and dead-letter; the server never gives up silently.
            max_deliver=-1,
            max_ack_pending=max(256, self.concurrency * 32),
            deliver_policy=DeliverPolicy.NEW if deliver_new_only else DeliverPolicy.ALL,
        )
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._fetching = False
        self._slots = asyncio.Semaphore(self.concurrency)
        self._inflight: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sub = await self._bind()
        self._task = asyncio.create_task(self._loop(sub), name=f"consumer:{self.durable}")

    async def stop(self) -> None:
        """Stop fetching; let handlers in flight finish and hand back what was only prefetched."""
        if self._task is None:
            return
        self._stopping = True
        if self._fetching:
            self._task.cancel()  # waiting on the server: nothing of ours is interrupted
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    async def _loop(self, sub: JetStreamContext.PullSubscription) -> None:
        pause = 0.5
        try:
            while not self._stopping:
                if self.gate is not None and not self.gate.is_set():
                    self._fetching = True  # nothing of ours in flight: stop() may cancel
                    try:
                        await self.gate.wait()
                    finally:
                        self._fetching = False
                    continue
                try:
                    self._fetching = True
                    messages = await sub.fetch(self.batch, timeout=5.0)
                except TimeoutError:
                    # Nothing to fetch. nats-py raises its own TimeoutError or, when the wait
                    # expires between its two requests, asyncio's: both are this builtin.
                    continue
                except (nats.errors.Error, OSError) as exc:
                    # NATS restarting, JetStream recovering (503), the consumer deleted (404):
                    # say so, back off, and bind again; never stop consuming silently.
                    log.warning("consumer_fetch_failed", consumer=self.durable, error=repr(exc))
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 15.0)
                    with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
                        sub = await self._bind()
                    continue
                finally:
                    self._fetching = False
                pause = 0.5
                await self._dispatch(messages)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _bind(self) -> JetStreamContext.PullSubscription:
        js = self.bus.js
        await js.add_consumer(self.stream, self.config)  # creates, or updates in place
        return await js.pull_subscribe_bind(durable=self.durable, stream=self.stream)

    async def _dispatch(self, messages: list[Msg]) -> None:
        fetched = time.monotonic()
        for i, msg in enumerate(messages):
            if self._stopping or (self.gate is not None and not self.gate.is_set()):
                # Draining or deposed: give the rest back now, so another replica need not wait
                # ack_wait.
                for rest in messages[i:]:
                    with contextlib.suppress(Exception):
                        await rest.nak()
                return
            if time.monotonic() - fetched > self.retry.ack_wait / 3:
                # Prefetched but not yet started: keep JetStream from redelivering any of them.
                for waiting in messages[i:]:
                    with contextlib.suppress(Exception):
                        await waiting.in_progress()
                fetched = time.monotonic()
            if self.concurrency == 1:
                await self._handle(msg)
            else:
                await self._slots.acquire()
                task = asyncio.create_task(self._handle_in_slot(msg))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def _keep_alive(self, msg: Msg) -> None:
        """While a handler runs, tell JetStream it is still at work so it is not redelivered."""
        while True:
            await asyncio.sleep(self.retry.ack_wait / 3)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _handle_in_slot(self, msg: Msg) -> None:
        try:
            await self._handle(msg)
        finally:
            self._slots.release()

    async def _handle(self, msg: Msg) -> None:
        name, consumer, retry = self.event_type.name, self.durable, self.retry
        try:
            delivered = msg.metadata.num_delivered
            if delivered > retry.max_deliver:
                # Earlier deliveries timed out without an answer (the handler hung or died).
                await self.bus.dead_letter(msg, consumer, delivered, "no ack after every delivery")
                HANDLED.labels(name, consumer, "dead_letter").inc()
                return
            try:
                event = self.event_type.from_bytes(msg.data)
            except ValidationError as exc:
                await self.bus.dead_letter(msg, consumer, delivered, f"undecodable: {exc}")
                HANDLED.labels(name, consumer, "dead_letter").inc()
                return
            started = time.perf_counter()
            keepalive = asyncio.create_task(self._keep_alive(msg))
            try:
                await self.handler(event)
            except Exception as exc:
                HANDLE_SECONDS.labels(name, consumer).observe(time.perf_counter() - started)
                if delivered >= retry.max_deliver:
                    log.error(
                        "event_dead_lettered", event_name=name, event_id=event.event_id,
                        consumer=consumer, deliveries=delivered, error=repr(exc),
                    )  # fmt: skip
                    await self.bus.dead_letter(msg, consumer, delivered, repr(exc))
                    HANDLED.labels(name, consumer, "dead_letter").inc()
                else:
                    log.warning(
                        "event_handler_failed", event_name=name, event_id=event.event_id,
                        consumer=consumer, delivery=delivered, error=repr(exc),
                    )  # fmt: skip
                    await msg.nak(delay=retry.delay(delivered))
                    HANDLED.labels(name, consumer, "retry").inc()
                return
            finally:
                keepalive.cancel()
            HANDLE_SECONDS.labels(name, consumer).observe(time.perf_counter() - started)
            await msg.ack()
            HANDLED.labels(name, consumer, "ok").inc()
        except Exception as exc:
            # Acking or dead-lettering failed (NATS away): JetStream redelivers after ack_wait.
            log.warning("event_settle_failed", event_name=name, consumer=consumer, error=repr(exc))
