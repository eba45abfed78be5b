"""Wiring of the gpu agent service:
settings, gRPC API, subscriptions, background loops.

Its behaviour arrives with its issue (issue 5: inventory and job execution); until then it
starts through the shared runtime, reports SERVING on gRPC health and stops cleanly.
"""

from __future__ import annotations

from ciuic_common.components import service as component
from ciuic_common.proto import gpu_agent_pb2_grpc
from ciuic_common.service import Service
from ciuic_common.settings import ServiceSettings

INFO = component("gpu_agent")


class GpuAgentSettings(ServiceSettings):
    grpc_port: int = INFO.grpc_port
    metrics_port: int = INFO.metrics_port


class GpuAgentApi(gpu_agent_pb2_grpc.AgentServiceServicer):
    """The gRPC API of the gpu agent (`ciuic.v1.AgentService`)."""


def build(settings: GpuAgentSettings | None = None) -> Service:
    """The gpu agent service, ready to run."""
    service = Service(
        INFO.name,
        settings or GpuAgentSettings(),
        uses=("nats", "s3"),
        migrations=None,
    )
    service.add_grpc(
        gpu_agent_pb2_grpc.add_AgentServiceServicer_to_server, GpuAgentApi(), INFO.proto_service
    )
    return service
