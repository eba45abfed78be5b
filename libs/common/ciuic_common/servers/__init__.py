"""Real servers from PyPI wheels (NATS, PostgreSQL, S3), run on this machine for `ciuic up`,
tests and benchmarks."""

from ciuic_common.servers._base import (
    LocalServer,
    Port,
    ServerError,
    ServerProcess,
    free_port,
    pid_alive,
    port_is_free,
    running,
    tail,
    terminate,
)
from ciuic_common.servers.nats import NatsServer
from ciuic_common.servers.postgres import PostgresServer
from ciuic_common.servers.seaweedfs import S3Server, free_s3_port

__all__ = [
    "LocalServer",
    "NatsServer",
    "Port",
    "PostgresServer",
    "S3Server",
    "ServerError",
    "ServerProcess",
    "free_port",
    "free_s3_port",
    "pid_alive",
    "port_is_free",
    "running",
    "tail",
    "terminate",
]
