"""Every service starts through the shared runtime against the real servers, reports SERVING on
gRPC health, exposes Prometheus metrics, and drains and exits 0 on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciuic_common.components import SERVICES, ServiceInfo
from ciuic_common.rpc import health_check_sync
from ciuic_common.servers import NatsServer, PostgresServer, free_port
from ciuic_common.settings import S3Settings

pytestmark = [pytest.mark.nats, pytest.mark.postgres, pytest.mark.s3, pytest.mark.slow]


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def platform_env(
    nats_server: NatsServer, postgres_server: PostgresServer, s3_server: S3Settings
) -> dict[str, str]:
    return {
        **os.environ,
        "CIUIC_NATS_URL": nats_server.url,
        "CIUIC_DATABASE_URL": postgres_server.url.rsplit("/", 1)[0] + "/runtime",
        "CIUIC_S3_ENDPOINT": s3_server.s3_endpoint,
        "CIUIC_S3_ACCESS_KEY": s3_server.s3_access_key,
        "CIUIC_S3_SECRET_KEY": s3_server.s3_secret_key.get_secret_value(),
        "CIUIC_LOG_FORMAT": "json",
    }


@pytest.fixture(scope="module")
def services(
    platform_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[subprocess.Popen[bytes], int, int, Path]]]:
    """All eight services, started at once as processes on free ports."""
    logs = tmp_path_factory.mktemp("service-logs")
    running = {}
    for info in SERVICES:
        grpc_port, metrics_port = free_port(), free_port()
        log = logs / f"{info.name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / info.script)],
                env={
                    **platform_env,
                    "CIUIC_GRPC_PORT": str(grpc_port),
                    "CIUIC_METRICS_PORT": str(metrics_port),
                    "CIUIC_WEBHOOK_PORT": str(free_port()),
                    "CIUIC_HOME": str(logs),
                },
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        running[info.name] = (proc, grpc_port, metrics_port, log)
    yield running
    for proc, *_ in running.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("info", SERVICES, ids=lambda s: s.name)
def test_service_reports_serving_and_exposes_metrics(
    services: dict[str, tuple[subprocess.Popen[bytes], int, int, Path]], info: ServiceInfo
) -> None:
    proc, grpc_port, metrics_port, log = services[info.name]
    target = f"127.0.0.1:{grpc_port}"
    wait_until(
        lambda: proc.poll() is not None or health_check_sync(target) == "SERVING",
        60,
        f"{info.name} to be healthy",
    )
    assert proc.poll() is None, log.read_text()
    assert health_check_sync(target, service=info.proto_service) == "SERVING"

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert f'ciuic_service_up{{service="{info.name}"}} 1.0' in metrics


@pytest.mark.parametrize("info", SERVICES, ids=lambda s: s.name)
def test_service_drains_and_exits_cleanly_on_sigterm(
    services: dict[str, tuple[subprocess.Popen[bytes], int, int, Path]], info: ServiceInfo
) -> None:
    proc, grpc_port, _, log = services[info.name]
    wait_until(lambda: health_check_sync(f"127.0.0.1:{grpc_port}") == "SERVING", 60, info.name)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()
    lines = log.read_text()
    assert '"service_draining"' in lines
    assert '"service_stopped"' in lines


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("CIUIC_NATS_URL", "nats://127.0.0.1:1", "cannot connect to NATS at nats://127.0.0.1:1"),
        (
            "CIUIC_DATABASE_URL",
            "postgresql://postgres:hunter2@127.0.0.1:1/x",
            "cannot connect to PostgreSQL at postgresql://postgres:***@127.0.0.1:1/x",
        ),
    ],
)
def test_an_unreachable_dependency_is_one_clear_error_and_exit_1(
    platform_env: dict[str, str], setting: str, value: str, message: str
) -> None:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ciuic-scheduler")],
        env={
            **platform_env,
            setting: value,
            "CIUIC_NATS_CONNECT_TIMEOUT": "2",
            "CIUIC_GRPC_PORT": "0",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "hunter2" not in proc.stderr, "no password in the logs"
    assert "Traceback" not in proc.stderr
