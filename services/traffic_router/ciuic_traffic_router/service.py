"""Wiring of the traffic router service:
settings, gRPC API, subscriptions, background loops.

Its behaviour arrives with its issue (rollouts and experiments); until then it starts through
the shared runtime, reports SERVING on gRPC health and stops cleanly.
"""

from __future__ import annotations

from pathlib import Path

from ciuic_common.components import service as component
from ciuic_common.proto import traffic_router_pb2_grpc
from ciuic_common.service import Service
from ciuic_common.settings import ServiceSettings

INFO = component("traffic_router")


class TrafficRouterSettings(ServiceSettings):
    grpc_port: int = INFO.grpc_port
    metrics_port: int = INFO.metrics_port


class TrafficRouterApi(traffic_router_pb2_grpc.TrafficRouterServiceServicer):
    """The gRPC API of the traffic router (`ciuic.v1.TrafficRouterService`)."""


def build(settings: TrafficRouterSettings | None = None) -> Service:
    """The traffic router service, ready to run."""
    service = Service(
        INFO.name,
        settings or TrafficRouterSettings(),
        uses=("nats", "postgres", "s3"),
        migrations=Path(__file__).resolve().parent.parent / "migrations",
    )
    service.add_grpc(
        traffic_router_pb2_grpc.add_TrafficRouterServiceServicer_to_server,
        TrafficRouterApi(),
        INFO.proto_service,
    )
    return service
