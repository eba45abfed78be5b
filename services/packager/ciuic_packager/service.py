"""Wiring of the packager service:
settings, gRPC API, subscriptions, background loops.

Its behaviour arrives with its issue (model export and registry); until then it starts through
the shared runtime, reports SERVING on gRPC health and stops cleanly.
"""

from __future__ import annotations

from pathlib import Path

from ciuic_common.components import service as component
from ciuic_common.proto import packager_pb2_grpc
from ciuic_common.service import Service
from ciuic_common.settings import ServiceSettings

INFO = component("packager")


class PackagerSettings(ServiceSettings):
    grpc_port: int = INFO.grpc_port
    metrics_port: int = INFO.metrics_port


class PackagerApi(packager_pb2_grpc.PackagerServiceServicer):
    """The gRPC API of the packager (`ciuic.v1.PackagerService`)."""


def build(settings: PackagerSettings | None = None) -> Service:
    """The packager service, ready to run."""
    service = Service(
        INFO.name,
        settings or PackagerSettings(),
        uses=("nats", "postgres", "s3"),
        migrations=Path(__file__).resolve().parent.parent / "migrations",
    )
    service.add_grpc(
        packager_pb2_grpc.add_PackagerServiceServicer_to_server, PackagerApi(), INFO.proto_service
    )
    return service
