"""Wiring of the data versioner service:
settings, gRPC API, subscriptions, background loops.

Its behaviour arrives with its issue (dataset versions and lineage); until then it starts
through the shared runtime, reports SERVING on gRPC health and stops cleanly.
"""

from __future__ import annotations

from pathlib import Path

from ciuic_common.components import service as component
from ciuic_common.proto import data_versioner_pb2_grpc
from ciuic_common.service import Service
from ciuic_common.settings import ServiceSettings

INFO = component("data_versioner")


class DataVersionerSettings(ServiceSettings):
    grpc_port: int = INFO.grpc_port
    metrics_port: int = INFO.metrics_port


class DataVersionerApi(data_versioner_pb2_grpc.DataVersionerServiceServicer):
    """The gRPC API of the data versioner (`ciuic.v1.DataVersionerService`)."""


def build(settings: DataVersionerSettings | None = None) -> Service:
    """The data versioner service, ready to run."""
    service = Service(
        INFO.name,
        settings or DataVersionerSettings(),
        uses=("nats", "postgres", "s3"),
        migrations=Path(__file__).resolve().parent.parent / "migrations",
    )
    service.add_grpc(
        data_versioner_pb2_grpc.add_DataVersionerServiceServicer_to_server,
        DataVersionerApi(),
        INFO.proto_service,
    )
    return service
