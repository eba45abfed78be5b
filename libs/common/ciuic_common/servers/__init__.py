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

__all__ = [
    "LocalServer",
    "NatsServer",
    "Port",
    "PostgresServer",
    "ServerError",
    "ServerProcess",
    "free_port",
    "pid_alive",
    "port_is_free",
    "running",
    "tail",
    "terminate",
]
