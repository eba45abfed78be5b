"""The parts of a ciuic platform and where they listen by default: one table read by the
service runtime, the `ciuic` CLI (`up`, `status`), the deploy files' test and the docs."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["INFRASTRUCTURE", "SERVICES", "Infrastructure", "ServiceInfo", "service"]


@dataclass(frozen=True)
class ServiceInfo:
    """One ciuic service."""

    name: str  # package suffix and schema: `gpu_agent`
    grpc_port: int
    metrics_port: int
    proto_service: str  # full gRPC service name
    summary: str
    uses_database: bool = True

    @property
    def script(self) -> str:
        """The console script that runs it: `ciuic-gpu-agent`."""
        return f"ciuic-{self.name.replace('_', '-')}"

    @property
    def package(self) -> str:
        return f"ciuic_{self.name}"

    @property
    def env_prefix(self) -> str:
        """Settings that address this service from elsewhere: `CIUIC_GPU_AGENT_ADDR`."""
        return f"CIUIC_{self.name.upper()}_"


#: The eight services, in DESIGN.md's order; gRPC ports from 50051 upward in that order.
SERVICES: tuple[ServiceInfo, ...] = (
    ServiceInfo("trigger", 50051, 9101, "ciuic.v1.TriggerService",
                "webhooks in, validated pipeline runs out"),
    ServiceInfo("scheduler", 50052, 9102, "ciuic.v1.SchedulerService",
                "runs as DAGs, sweeps, GPU placement"),
    ServiceInfo("gpu_agent", 50053, 9103, "ciuic.v1.AgentService",
                "runs jobs on a GPU host", uses_database=False),
    ServiceInfo("data_versioner", 50054, 9104, "ciuic.v1.DataVersionerService",
                "content-addressed dataset versions"),
    ServiceInfo("metrics_collector", 50055, 9105, "ciuic.v1.MetricsService",
                "metric ingestion, queries, dashboard"),
    ServiceInfo("alerter", 50056, 9106, "ciuic.v1.AlerterService",
                "alert rules on live metrics"),
    ServiceInfo("packager", 50057, 9107, "ciuic.v1.PackagerService",
                "export, verify, register models"),
    ServiceInfo("traffic_router", 50058, 9108, "ciuic.v1.TrafficRouterService",
                "inference routing, rollouts, A/B reports"),
)  # fmt: skip


@dataclass(frozen=True)
class Infrastructure:
    """A server the platform runs on."""

    name: str  # nats, postgres, s3
    port: int
    summary: str


INFRASTRUCTURE: tuple[Infrastructure, ...] = (
    Infrastructure("nats", 4222, "NATS with JetStream: the event bus"),
    Infrastructure("postgres", 5432, "PostgreSQL: one schema per service"),
    Infrastructure("s3", 8333, "S3 (SeaweedFS): artifacts, datasets, the model registry"),
)


def service(name: str) -> ServiceInfo:
    """The service called `name` (`gpu_agent` or `gpu-agent`)."""
    wanted = name.replace("-", "_")
    for info in SERVICES:
        if info.name == wanted:
            return info
    known = ", ".join(s.name for s in SERVICES)
    raise KeyError(f"no service {name!r}; the services are {known}")
