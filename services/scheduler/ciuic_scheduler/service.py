"""Wiring of the scheduler service: the leader election, the engine's subscriptions and loops,
heartbeats, and the gRPC API.

Replicas run the same code. Each hears agents' heartbeats and serves the API; only the one
holding the JetStream KV lock consumes events and places jobs (its consumers' gate is open).
A standby takes over within `leader_ttl` seconds of the leader going silent, at once when the
leader shuts down cleanly.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

from pydantic import Field

from ciuic_common.bus import RetryPolicy
from ciuic_common.components import service as component
from ciuic_common.election import LeaderElection
from ciuic_common.events import (
    AgentHeartbeat,
    AgentRegistered,
    BaselineResolved,
    DataVersionReady,
    JobAccepted,
    JobFinished,
    JobStarted,
    ModelRegistered,
    PipelineRequested,
)
from ciuic_common.proto import scheduler_pb2_grpc
from ciuic_common.service import Service
from ciuic_common.settings import ServiceSettings
from ciuic_scheduler.api import WAKE_CHANNEL, SchedulerApi
from ciuic_scheduler.engine import AgentMonitor, Engine, Timing

INFO = component("scheduler")
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
LEADER_BUCKET = "ciuic-scheduler-leader"


def _replica() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class SchedulerSettings(ServiceSettings):
    grpc_port: int = INFO.grpc_port
    metrics_port: int = INFO.metrics_port
    #: This replica's name in the leader lock and logs.
    replica_id: str = Field(default_factory=_replica)
    #: Seconds the leader lock outlives a silent leader: how soon a standby takes over.
    leader_ttl: float = Field(default=3.0, ge=1.0)
    #: Seconds an agent has to accept an assignment before the job is placed elsewhere.
    ack_timeout: float = Field(default=15.0, gt=0)
    #: Seconds of silence after which an agent is lost and its jobs requeued.
    agent_lost_after: float = Field(default=10.0, gt=0)
    #: The agents' grace between SIGTERM and SIGKILL when a job is stopped.
    stop_grace: float = Field(default=30.0, ge=0)
    #: The longest wait between two placement passes.
    tick_interval: float = Field(default=0.5, gt=0)


def build(settings: SchedulerSettings | None = None) -> Service:
    """The scheduler service, ready to run."""
    settings = settings or SchedulerSettings()
    service = Service(INFO.name, settings, uses=("nats", "postgres"), migrations=MIGRATIONS)
    db, outbox = service.db, service.outbox
    assert db is not None
    assert outbox is not None
    monitor = AgentMonitor()
    engine = Engine(
        db,
        outbox,
        monitor,
        identity=settings.replica_id,
        bucket=settings.s3_bucket,
        timing=Timing(
            ack_timeout=settings.ack_timeout,
            agent_lost_after=settings.agent_lost_after,
            stop_grace=settings.stop_grace,
            tick_interval=settings.tick_interval,
        ),
    )
    election = LeaderElection(
        lambda: service.bus.js,
        bucket=LEADER_BUCKET,
        key="leader",
        identity=settings.replica_id,
        ttl=settings.leader_ttl,
    )
    handlers: list[tuple[type[Any], Any]] = [
        (PipelineRequested, engine.on_pipeline_requested),
        (AgentRegistered, engine.on_agent_registered),
        (JobAccepted, engine.on_job_accepted),
        (JobStarted, engine.on_job_started),
        (JobFinished, engine.on_job_finished),
        (DataVersionReady, engine.on_data_version_ready),
        (ModelRegistered, engine.on_model_registered),
        (BaselineResolved, engine.on_baseline_resolved),
    ]
    # What agents and services report is the only record of it: keep trying through a database
    # outage or a failover (backing off to a minute) rather than dead-letter it.
    patient = RetryPolicy(max_deliver=1000, backoff=(1.0, 5.0, 15.0, 30.0, 60.0))
    for event_type, handler in handlers:
        service.subscribe(event_type, handler, gate=engine.leading, retry=patient)

    async def heartbeat(event: AgentHeartbeat) -> None:
        engine.on_heartbeat(event)

    service.subscribe(AgentHeartbeat, heartbeat)
    service.add_grpc(
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server,
        SchedulerApi(db, outbox, monitor),
        INFO.proto_service,
    )

    async def campaign() -> None:
        await election.run(engine.take_over, engine.step_down)

    async def listen() -> None:
        """Wake the engine when another replica records a cancel or a stop."""

        def wake(*_: object) -> None:
            engine.wake()

        async with db.connection() as conn:
            await conn.add_listener(WAKE_CHANNEL, wake)
            try:
                await asyncio.Event().wait()
            finally:
                await conn.remove_listener(WAKE_CHANNEL, wake)

    service.background("election", campaign)
    service.background("engine", engine.run)
    service.background("wake", listen)
    return service
