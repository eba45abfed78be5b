"""The one way a ciuic service runs.

Start, in order: settings → connections (NATS, PostgreSQL, S3) → migrations → subscriptions →
gRPC (health SERVING) → background tasks. On SIGTERM or SIGINT, drain in reverse: health goes
NOT_SERVING, consumers stop taking messages (handlers in flight finish), gRPC stops with a grace
period, background tasks are cancelled, the outbox is flushed, connections close.

    service = Service("scheduler", SchedulerSettings(), migrations=HERE / "migrations")
    service.subscribe(JobFinished, on_job_finished, durable="scheduler-job-finished")
    service.add_grpc(add_SchedulerServiceServicer_to_server, SchedulerApi(), INFO.proto_service)
    run_service(service)
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from prometheus_client import Gauge, start_http_server

from ciuic_common.bus import Bus, Handler, RetryPolicy
from ciuic_common.db import Database
from ciuic_common.errors import CiuicError
from ciuic_common.events import Event
from ciuic_common.logging import configure_logging, get_logger
from ciuic_common.outbox import Outbox, OutboxRelay
from ciuic_common.rpc import GrpcServer
from ciuic_common.settings import ServiceSettings
from ciuic_common.storage import Storage

__all__ = ["Service", "run_service"]

log = get_logger(__name__)

UP = Gauge("ciuic_service_up", "1 while the service serves, 0 while it drains", ["service"])
STARTED = Gauge("ciuic_service_start_time_seconds", "Unix time the service started", ["service"])

Uses = Literal["nats", "postgres", "s3"]
Task = Callable[[], Awaitable[None]]


class Service:
    """A ciuic service: its connections, subscriptions, gRPC API and background loops."""

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        *,
        uses: tuple[Uses, ...] = ("nats", "postgres", "s3"),
        migrations: Path | None = None,
        schema: str | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.uses = uses
        self.migrations = migrations
        self.schema = schema or name
        self.bus = Bus(
            settings.nats_url, name=f"ciuic-{name}", connect_timeout=settings.nats_connect_timeout
        )
        self.db: Database | None = None
        self.outbox: Outbox | None = None
        if "postgres" in uses:
            self.db = Database(
                settings.database_url,
                self.schema,
                min_size=settings.database_pool_min,
                max_size=settings.database_pool_max,
            )
            self.outbox = Outbox(self.schema)
        self.storage: Storage | None = Storage(settings) if "s3" in uses else None
        self.grpc = GrpcServer(name, settings.grpc_host, settings.grpc_port)
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self._tasks: list[tuple[str, Task]] = []
        self._on_start: list[Task] = []
        self._on_stop: list[Task] = []
        self._on_drain: list[Task] = []
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()

    # -- declaring what the service does -----------------------------------------------------
    def subscribe(
        self,
        event_type: type[Any],
        handler: Handler[Any],
        *,
        durable: str | None = None,
        keys: dict[str, str] | None = None,
        retry: RetryPolicy | None = None,
        concurrency: int = 1,
        gate: asyncio.Event | None = None,
    ) -> None:
        """Handle `event_type` on a durable consumer shared by this service's replicas (only
        while `gate` is set, when given: see `Bus.subscribe`)."""
        durable = durable or f"{self.name}-{event_type.name.replace('.', '-')}"
        self.bus.subscribe(
            event_type,
            handler,
            durable=durable,
            keys=keys,
            retry=retry,
            concurrency=concurrency,
            gate=gate,
        )

    def add_grpc(self, register: Callable[[Any, Any], None], servicer: Any, full_name: str) -> None:
        """Serve `servicer` (registered with `register`) under its full proto service name."""
        self.grpc.add(register, servicer, full_name)

    def background(self, name: str, task: Task) -> None:
        """Run `task` for the life of the service; it is cancelled at shutdown."""
        self._tasks.append((name, task))

    def on_start(self, hook: Task) -> None:
        """Run `hook` after connections and migrations, before subscriptions start."""
        self._on_start.append(hook)

    def on_drain(self, hook: Task) -> None:
        """Run `hook` as the drain begins (health NOT_SERVING), before gRPC stops: end long
        streams there, or they hold the stop for its whole grace period."""
        self._on_drain.append(hook)

    def on_stop(self, hook: Task) -> None:
        """Run `hook` during drain, before connections close."""
        self._on_stop.append(hook)

    async def publish(self, event: Event) -> bool:
        """Publish directly (no transaction involved); see `outbox` for changes with events."""
        return await self.bus.publish(event)

    # -- running ------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Begin a graceful drain (what SIGTERM does)."""
        self._stopping.set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def run(self) -> None:
        """Start everything, serve until `request_stop()`, then drain."""
        started = time.monotonic()
        log.info("service_starting", grpc_port=self.settings.grpc_port)
        async with contextlib.AsyncExitStack() as stack:
            await self.bus.connect()
            stack.push_async_callback(self.bus.close)
            if self.db is not None:
                await self.db.connect()
                stack.push_async_callback(self.db.close)
                dirs = [(self.name, self.migrations)] if self.migrations else []
                await self.db.migrate(*dirs)
            if self.storage is not None:
                stack.push_async_callback(self.storage.close)
            for hook in self._on_start:
                await hook()

            await self.bus.start()
            stack.push_async_callback(self.bus.stop_consuming)

            self.grpc_port = await self.grpc.start()
            stack.push_async_callback(self.grpc.stop, self.settings.shutdown_grace)

            self._start_metrics(stack)

            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._guard(n, t), name=n) for n, t in self._tasks]
                if self.db is not None:
                    relay = OutboxRelay(self.db, self.bus)
                    tasks.append(group.create_task(self._guard("outbox", relay.run)))
                UP.labels(self.name).set(1)
                STARTED.labels(self.name).set(time.time())
                log.info(
                    "service_ready",
                    grpc_port=self.grpc_port,
                    metrics_port=self.metrics_port,
                    seconds=round(time.monotonic() - started, 3),
                )
                self._ready.set()
                await self._stopping.wait()

                log.info("service_draining")
                UP.labels(self.name).set(0)
                await self.grpc.set_serving(False)
                for hook in self._on_drain:
                    await hook()
                await self.bus.stop_consuming()
                await self.grpc.stop(self.settings.shutdown_grace)
                for hook in self._on_stop:
                    await hook()
                for task in tasks:
                    task.cancel()
            if self.db is not None:
                # Whatever committed while we drained still goes out before we disconnect.
                with contextlib.suppress(Exception):
                    await OutboxRelay(self.db, self.bus).drain()
        log.info("service_stopped")

    async def _guard(self, name: str, task: Task) -> None:
        """Run a background task; if it dies, log why and stop the service (a supervisor restarts
        it) rather than carry on half-working."""
        try:
            await task()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("background_task_failed", task=name, error=repr(exc))
            self.request_stop()

    def _start_metrics(self, stack: contextlib.AsyncExitStack) -> None:
        server, thread = start_http_server(self.settings.metrics_port, self.settings.metrics_host)
        self.metrics_port = int(server.server_port)

        async def stop() -> None:
            server.shutdown()
            await asyncio.to_thread(thread.join, 5)

        stack.push_async_callback(stop)


def run_service(service: Service) -> None:
    """Run `service` in this process until SIGTERM/SIGINT; exit 1 on a start-up error."""
    settings = service.settings
    configure_logging(settings.log_format, settings.log_level, service=service.name)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.request_stop)
        await service.run()

    try:
        asyncio.run(main())
    except CiuicError as exc:
        log.error("service_failed", error=str(exc))
        raise SystemExit(1) from None
