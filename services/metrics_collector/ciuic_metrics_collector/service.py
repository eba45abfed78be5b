"""Wiring of the metrics collector service:
settings, gRPC API, subscriptions, background loops.

Its behaviour arrives with its issue (issue 6: metric queries and streams); until then it starts
through the shared runtime, reports SERVING on gRPC health and stops cleanly.
"""

from __future__ import annotations

from pathlib import Path

from ciuic_common.components import service as component
from ciuic_common.proto import metrics_collector_pb2_grpc
from ciuic_common.service import Service
from ciuic_common.settings import ServiceSettings

INFO = component("metrics_collector")


class MetricsCollectorSettings(ServiceSettings):
    grpc_port: int = INFO.grpc_port
    metrics_port: int = INFO.metrics_port


class MetricsCollectorApi(metrics_collector_pb2_grpc.MetricsServiceServicer):
    """The gRPC API of the metrics collector (`ciuic.v1.MetricsService`)."""


def build(settings: MetricsCollectorSettings | None = None) -> Service:
    """The metrics collector service, ready to run."""
    service = Service(
        INFO.name,
        settings or MetricsCollectorSettings(),
        uses=("nats", "postgres", "s3"),
        migrations=Path(__file__).resolve().parent.parent / "migrations",
    )
    service.add_grpc(
        metrics_collector_pb2_grpc.add_MetricsServiceServicer_to_server,
        MetricsCollectorApi(),
        INFO.proto_service,
    )
    return service
