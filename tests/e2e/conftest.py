"""The local platform for end-to-end tests: a temporary CIUIC_HOME on free ports, stopped and
removed afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciuic_common.servers.seaweedfs import S3Server, free_s3_port
from tests.e2e.stack import CIUIC, SERVICE_PORTS, free_block


@pytest.fixture
def stack_env() -> Iterator[dict[str, str]]:
    # Not under pytest's tmp_path, which a concurrent pytest may reset to mode 0700 (PostgreSQL
    # runs as its own system user when we are root).
    home = Path(tempfile.mkdtemp(prefix="ciuic-home-"))
    s3_port = free_s3_port()
    # SeaweedFS derives nine more ports from its S3 port: keep every other choice off them.
    taken = {p.number for p in S3Server(data_dir=home, port=s3_port).ports()}
    env = {
        **os.environ,
        "CIUIC_HOME": str(home),
        "CIUIC_NATS_PORT": str(free_block(1, taken)),
        "CIUIC_NATS_MONITOR_PORT": str(free_block(1, taken)),
        "CIUIC_POSTGRES_PORT": str(free_block(1, taken)),
        "CIUIC_S3_PORT": str(s3_port),
        "CIUIC_GRPC_PORT_BASE": str(free_block(SERVICE_PORTS, taken)),
        "CIUIC_METRICS_PORT_BASE": str(free_block(SERVICE_PORTS, taken)),
        "CIUIC_WEBHOOK_PORT": str(free_block(1, taken)),
        "CIUIC_DASHBOARD_PORT": str(free_block(1, taken)),
    }
    yield env
    subprocess.run([CIUIC, "down"], env=env, capture_output=True, timeout=180)
    shutil.rmtree(home, ignore_errors=True)
