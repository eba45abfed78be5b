"""ciuic's pytest plugin: real servers for tests (`pytest_plugins = ["ciuic_common.testing"]`).

Fixtures: `nats_server`/`nats_url` (NATS with JetStream), `postgres_server`/`database_url`
(PostgreSQL, a fresh database per test), `s3_server`/`storage`/`s3_bucket` (SeaweedFS S3, a
fresh bucket per test). Servers start once per session on free ports in temporary directories.
"""

from ciuic_common.testing.s3 import s3_bucket, s3_server, start_s3, storage
from ciuic_common.testing.servers import (
    ciuic_tmp,
    database_url,
    nats_server,
    nats_url,
    postgres_server,
    start_nats,
    start_postgres,
)

__all__ = [
    "ciuic_tmp",
    "database_url",
    "nats_server",
    "nats_url",
    "postgres_server",
    "s3_bucket",
    "s3_server",
    "start_nats",
    "start_postgres",
    "start_s3",
    "storage",
]
