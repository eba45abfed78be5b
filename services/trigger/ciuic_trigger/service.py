"""Wiring of the trigger service:
settings, gRPC API, subscriptions, background loops.

Its behaviour arrives with its issue (issue 3: webhooks, TriggerRun, deliveries); until then it
starts through the shared runtime, reports SERVING on gRPC health and stops cleanly.
"""

from __future__ import annotations

from pathlib import Path

from ciuic_common.components import service as component
from ciuic_common.proto import trigger_pb2_grpc
from ciuic_common.service import Service
from ciuic_common.settings import ServiceSettings

INFO = component("trigger")


class TriggerSettings(ServiceSettings):
    grpc_port: int = INFO.grpc_port
    metrics_port: int = INFO.metrics_port


class TriggerApi(trigger_pb2_grpc.TriggerServiceServicer):
    """The gRPC API of the trigger (`ciuic.v1.TriggerService`)."""


def build(settings: TriggerSettings | None = None) -> Service:
    """The trigger service, ready to run."""
    service = Service(
        INFO.name,
        settings or TriggerSettings(),
        uses=("nats", "postgres", "s3"),
        migrations=Path(__file__).resolve().parent.parent / "migrations",
    )
    service.add_grpc(
        trigger_pb2_grpc.add_TriggerServiceServicer_to_server, TriggerApi(), INFO.proto_service
    )
    return service
