"""pytest fixtures that run real NATS (JetStream) and PostgreSQL for the tests, on free ports in
temporary directories, once per session; each test gets clean state where it matters."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import nats
import pytest

from ciuic_common.servers import NatsServer, PostgresServer, ServerProcess, free_port


@pytest.fixture(scope="session")
def ciuic_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One temporary directory for the session's servers and their logs."""
    return tmp_path_factory.mktemp("ciuic")


def start_nats(root: Path) -> ServerProcess:
    """A fresh NATS server with JetStream under `root` (started)."""
    server = NatsServer(data_dir=root, port=free_port(), monitor_port=free_port())
    return ServerProcess(server, root / "nats.log").start()


@pytest.fixture(scope="session")
def nats_server(ciuic_tmp: Path) -> Iterator[NatsServer]:
    """A NATS server with JetStream for the whole session."""
    proc = start_nats(ciuic_tmp / "nats")
    assert isinstance(proc.server, NatsServer)
    yield proc.server
    proc.stop()


@pytest.fixture
async def nats_url(nats_server: NatsServer) -> str:
    """The session's NATS, emptied of every stream (and so every consumer) before the test."""
    await _delete_streams(nats_server.url)
    return nats_server.url


async def _delete_streams(url: str) -> None:
    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            assert info.config.name is not None
            await js.delete_stream(info.config.name)
    finally:
        await nc.close()


def start_postgres(root: Path) -> ServerProcess:
    """A throwaway PostgreSQL (fsync off) under `root` (started)."""
    server = PostgresServer(data_dir=root, port=free_port(), durable=False)
    return ServerProcess(server, root / "postgres.log").start()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session."""
    # Not under pytest's tmp_path: a concurrent pytest run resets that tree to mode 0700, which
    # would lock out PostgreSQL's own system user when we run as root.
    root = Path(tempfile.mkdtemp(prefix="ciuic-postgres-"))
    proc = start_postgres(root)
    assert isinstance(proc.server, PostgresServer)
    yield proc.server
    proc.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def database_url(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A new, empty database for this test; dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = postgres_server.url
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    yield admin.rsplit("/", 1)[0] + f"/{name}"
    conn = await asyncpg.connect(admin)
    try:
        await asyncio.wait_for(conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)'), 30)
    finally:
        await conn.close()
