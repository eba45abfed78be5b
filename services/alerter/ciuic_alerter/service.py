"""Wiring of the alerter service:
settings, gRPC API, subscriptions, background loops.

Its behaviour arrives with its issue (alert rules and states); until then it starts through the
shared runtime, reports SERVING on gRPC health and stops cleanly.
"""

from __future__ import annotations

from pathlib import Path

from ciuic_common.components import service as component
from ciuic_common.proto import alerter_pb2_grpc
from ciuic_common.service import Service
from ciuic_common.settings import ServiceSettings

INFO = component("alerter")


class AlerterSettings(ServiceSettings):
    grpc_port: int = INFO.grpc_port
    metrics_port: int = INFO.metrics_port


class AlerterApi(alerter_pb2_grpc.AlerterServiceServicer):
    """The gRPC API of the alerter (`ciuic.v1.AlerterService`)."""


def build(settings: AlerterSettings | None = None) -> Service:
    """The alerter service, ready to run."""
    service = Service(
        INFO.name,
        settings or AlerterSettings(),
        uses=("nats", "postgres", "s3"),
        migrations=Path(__file__).resolve().parent.parent / "migrations",
    )
    service.add_grpc(
        alerter_pb2_grpc.add_AlerterServiceServicer_to_server, AlerterApi(), INFO.proto_service
    )
    return service
