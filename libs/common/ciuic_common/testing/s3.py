"""pytest fixtures for a real S3 server (SeaweedFS) started once per session on free ports in a
temporary directory, with a fresh bucket per test."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ciuic_common.errors import NotFound
from ciuic_common.servers._base import ServerProcess
from ciuic_common.servers.seaweedfs import S3Server, free_s3_port
from ciuic_common.settings import S3Settings
from ciuic_common.storage import Storage


def start_s3(root: Path) -> ServerProcess:
    """A fresh S3 server with its data in `root/data` and its log in `root/s3.log` (started)."""
    server = S3Server(data_dir=root / "data", port=free_s3_port())
    return ServerProcess(server, root / "s3.log").start()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Settings]:
    """The settings of an S3 server that runs for the whole session."""
    proc = start_s3(tmp_path_factory.mktemp("s3"))
    assert isinstance(proc.server, S3Server)
    yield proc.server.client_settings()
    proc.stop()
    proc.server.remove_stale_sockets()


@pytest.fixture
async def storage(s3_server: S3Settings) -> AsyncIterator[Storage]:
    """A Storage client of the session's S3 server, closed after the test."""
    async with Storage(s3_server) as store:
        yield store


@pytest.fixture
async def s3_bucket(storage: Storage) -> AsyncIterator[str]:
    """A new, empty bucket for this test; deleted with its objects afterwards."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    await storage.ensure_bucket(name)
    yield name
    with contextlib.suppress(NotFound):  # the test may have deleted it itself
        await storage.delete_bucket(name)
