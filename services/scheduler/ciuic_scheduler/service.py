"""Wiring of the scheduler service:
settings, gRPC API, subscriptions, background loops.

Its behaviour arrives with its issue (issue 4: runs, jobs, trials, agents); until then it starts
through the shared runtime, reports SERVING on gRPC health and stops cleanly.
"""

from __future__ import annotations

from pathlib import Path

from ciuic_common.components import service as component
from ciuic_common.proto import scheduler_pb2_grpc
from ciuic_common.service import Service
from ciuic_common.settings import ServiceSettings

INFO = component("scheduler")


class SchedulerSettings(ServiceSettings):
    grpc_port: int = INFO.grpc_port
    metrics_port: int = INFO.metrics_port


class SchedulerApi(scheduler_pb2_grpc.SchedulerServiceServicer):
    """The gRPC API of the scheduler (`ciuic.v1.SchedulerService`)."""


def build(settings: SchedulerSettings | None = None) -> Service:
    """The scheduler service, ready to run."""
    service = Service(
        INFO.name,
        settings or SchedulerSettings(),
        uses=("nats", "postgres", "s3"),
        migrations=Path(__file__).resolve().parent.parent / "migrations",
    )
    service.add_grpc(
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server,
        SchedulerApi(),
        INFO.proto_service,
    )
    return service
