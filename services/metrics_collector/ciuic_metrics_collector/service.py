"""Wiring of the metrics collector service: ingestion of metric batches, what it learns of runs,
baselines for validation stages, the gRPC API, live-stream notifications and the dashboard.

Replicas run the same code and share the durable consumers: each batch is stored by one of
them, and every replica's streams hear of it through PostgreSQL's NOTIFY.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pydantic import Field

from ciuic_common.bus import RetryPolicy
from ciuic_common.components import service as component
from ciuic_common.events import (
    STREAMS,
    JobChanged,
    MetricsBatch,
    RunCreated,
    RunFinished,
    RunStageChanged,
)
from ciuic_common.proto import metrics_collector_pb2_grpc
from ciuic_common.service import Service
from ciuic_common.settings import ServiceSettings
from ciuic_metrics_collector.api import Limits, MetricsApi
from ciuic_metrics_collector.dashboard import serve_dashboard
from ciuic_metrics_collector.history import History
from ciuic_metrics_collector.ingest import Ingestor
from ciuic_metrics_collector.streams import Feed

INFO = component("metrics_collector")
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


class MetricsCollectorSettings(ServiceSettings):
    grpc_port: int = INFO.grpc_port
    metrics_port: int = INFO.metrics_port
    #: The live dashboard's HTTP address (0 picks a free port).
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8050
    #: Where the dashboard asks the scheduler for runs, stages and jobs.
    scheduler_addr: str = f"127.0.0.1:{component('scheduler').grpc_port}"
    #: Metric batches handled at once; their points are stored together (group commit).
    ingest_concurrency: int = Field(default=256, ge=1, le=4096)
    #: The most points one ingest transaction stores.
    ingest_max_points: int = Field(default=20_000, ge=1_000)
    #: Ingest transactions in flight at once in this replica.
    ingest_writers: int = Field(default=2, ge=1, le=16)
    #: Points a curve has by default, and at most, when a request does not say.
    curve_points: int = Field(default=1_000, ge=10)
    max_curve_points: int = Field(default=20_000, ge=10)


def build(settings: MetricsCollectorSettings | None = None) -> Service:
    """The metrics collector service, ready to run."""
    settings = settings or MetricsCollectorSettings()
    service = Service(INFO.name, settings, uses=("nats", "postgres"), migrations=MIGRATIONS)
    db, outbox = service.db, service.outbox
    assert db is not None
    assert outbox is not None

    ingestor = Ingestor(db, max_points=settings.ingest_max_points, writers=settings.ingest_writers)
    history = History(db, outbox)
    feed = Feed(db)

    service.subscribe(
        MetricsBatch,
        ingestor.on_batch,
        concurrency=settings.ingest_concurrency,
        retry=RetryPolicy(max_deliver=5, backoff=(0.5, 2.0, 5.0, 15.0), ack_wait=60.0),
    )
    run_events: list[tuple[type[Any], Any]] = [
        (RunCreated, history.on_run_created),
        (RunStageChanged, history.on_stage_changed),
        (RunFinished, history.on_run_finished),
        (JobChanged, history.on_job_changed),
    ]
    for event_type, handler in run_events:
        # One at a time, in stream order: a training stage's end precedes its validation's wait.
        service.subscribe(event_type, handler)

    api = MetricsApi(
        db,
        feed,
        history,
        Limits(curve_points=settings.curve_points, max_curve_points=settings.max_curve_points),
    )
    # Live streams (dashboard tabs, `ciuic metrics --follow`) end as the drain begins.
    service.on_drain(api.close)
    service.add_grpc(
        metrics_collector_pb2_grpc.add_MetricsServiceServicer_to_server,
        api,
        INFO.proto_service,
    )

    # Batch ids outlive the METRICS stream's window: past it, nothing can be redelivered.
    keep_batch_ids_s = STREAMS["METRICS"].max_age + 24 * 3600

    async def prune() -> None:
        while True:
            await ingestor.prune(keep_batch_ids_s)
            await asyncio.sleep(3600)

    service.background("ingest", ingestor.run)
    service.background("feed", feed.run)
    service.background("prune", prune)

    # --- the web dashboard (issue 6): a gRPC client of this API and of the scheduler's ----------
    async def dashboard() -> None:
        host = (
            settings.grpc_host if settings.grpc_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        )
        stop = await serve_dashboard(
            settings.dashboard_host,
            settings.dashboard_port,
            metrics_target=f"{host}:{service.grpc_port}",
            scheduler_target=settings.scheduler_addr,
        )
        try:
            await asyncio.Event().wait()
        finally:
            await stop()

    service.background("dashboard", dashboard)
    return service
