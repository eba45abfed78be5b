"""Wiring of the trigger service: webhooks over HTTP, intake workers, the gRPC API."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import Field

from ciuic_common.components import service as component
from ciuic_common.errors import ConfigError
from ciuic_common.proto import trigger_pb2_grpc
from ciuic_common.service import Service
from ciuic_common.settings import ServiceSettings
from ciuic_trigger.api import TriggerApi
from ciuic_trigger.git import Mirrors
from ciuic_trigger.http import build_app, serve
from ciuic_trigger.intake import IntakeWorkers

INFO = component("trigger")
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


class TriggerSettings(ServiceSettings):
    grpc_port: int = INFO.grpc_port
    metrics_port: int = INFO.metrics_port
    webhook_host: str = "127.0.0.1"
    webhook_port: int = 8080
    #: Larger bodies get 413. GitHub caps its payloads at 25 MB.
    webhook_max_body: int = Field(default=25 * 1024 * 1024, gt=0)
    #: Deliveries settled at once (each holds a database connection and may run git).
    intake_workers: int = Field(default=4, ge=1)
    #: Seconds a clone or fetch may take.
    git_timeout: float = Field(default=120.0, gt=0)


def build(settings: TriggerSettings | None = None) -> Service:
    """The trigger service, ready to run."""
    settings = settings or TriggerSettings()
    service = Service(INFO.name, settings, uses=("nats", "postgres"), migrations=MIGRATIONS)
    db, outbox = service.db, service.outbox
    assert db is not None
    assert outbox is not None
    mirrors = Mirrors(settings.home / "trigger" / "mirrors", timeout=settings.git_timeout)
    workers = IntakeWorkers(db, outbox, mirrors, workers=settings.intake_workers)
    service.add_grpc(
        trigger_pb2_grpc.add_TriggerServiceServicer_to_server,
        TriggerApi(db, outbox, mirrors),
        INFO.proto_service,
    )
    service.background("intake", workers.run)

    async def webhooks() -> None:
        app = build_app(db, workers.wake, max_body=settings.webhook_max_body)
        try:
            stop = await serve(app, settings.webhook_host, settings.webhook_port)
        except OSError as exc:
            raise ConfigError(
                f"trigger: cannot listen for webhooks on {settings.webhook_host}:"
                f"{settings.webhook_port} ({exc.strerror}); set CIUIC_WEBHOOK_PORT"
            ) from exc
        try:
            await asyncio.Event().wait()  # serve until the runtime cancels us
        finally:
            await stop()

    service.background("webhooks", webhooks)
    return service
