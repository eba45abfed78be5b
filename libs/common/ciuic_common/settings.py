"""Settings shared by every ciuic process, read from `CIUIC_*` environment variables.

Each service subclasses `ServiceSettings` once; the defaults work with `ciuic up` on one machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The S3 credentials `ciuic up` gives its S3 server and every client. Local use only.
LOCAL_S3_ACCESS_KEY = "ciuic"
LOCAL_S3_SECRET_KEY = "ciuic-local-secret"


class CiuicSettings(BaseSettings):
    """The base of every settings class: the `CIUIC_` prefix, and unknown variables ignored."""

    model_config = SettingsConfigDict(env_prefix="CIUIC_", extra="ignore", frozen=True)


class LoggingSettings(CiuicSettings):
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: `json` for services (one object a line), `console` for people.
    log_format: Literal["json", "console"] = "json"


class NatsSettings(CiuicSettings):
    nats_url: str = "nats://127.0.0.1:4222"
    #: Seconds to wait for the first connection before giving up.
    nats_connect_timeout: float = 10.0


class DatabaseSettings(CiuicSettings):
    #: One PostgreSQL database; each service keeps its tables in a schema of its own.
    database_url: str = "postgresql://postgres@127.0.0.1:5432/ciuic"
    database_pool_min: int = 1
    database_pool_max: int = 10


class S3Settings(CiuicSettings):
    s3_endpoint: str = "http://127.0.0.1:8333"
    s3_access_key: str = LOCAL_S3_ACCESS_KEY
    s3_secret_key: SecretStr = SecretStr(LOCAL_S3_SECRET_KEY)
    s3_region: str = "us-east-1"
    #: The bucket of run artifacts: logs, checkpoints, outputs (`runs/<run_id>/<job_id>/`).
    s3_bucket: str = "ciuic"


class ServiceSettings(LoggingSettings, NatsSettings, DatabaseSettings, S3Settings):
    """Everything a service process reads at start. Subclasses set their own port defaults."""

    #: Where local state lives (caches, logs of `ciuic up`).
    home: Path = Path(".ciuic")
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    #: Prometheus metrics on http://metrics_host:metrics_port/metrics; 0 picks a free port.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    #: Seconds in-flight work may take to finish after SIGTERM before it is cancelled.
    shutdown_grace: float = Field(default=10.0, ge=0)
