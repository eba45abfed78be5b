"""Storage against a real S3 server (SeaweedFS): streaming multipart transfers in bounded memory,
presigned URLs, error translation, and data that survives a server restart."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import tracemalloc
import urllib.request
import uuid
from pathlib import Path

import pytest

from ciuic_common.errors import ConfigError, NotFound, Unavailable
from ciuic_common.servers._base import ServerProcess, free_port
from ciuic_common.servers.seaweedfs import S3Server, free_s3_port
from ciuic_common.settings import S3Settings
from ciuic_common.storage import DEFAULT_CHUNK_SIZE, MiB, Storage

pytestmark = pytest.mark.s3


def write_random_file(path: Path, size: int, chunk: int = MiB) -> str:
    """Write `size` random bytes to `path` a chunk at a time; return their SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for offset in range(0, size, chunk):
            block = os.urandom(min(chunk, size - offset))
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(MiB):
            digest.update(block)
    return digest.hexdigest()


class Pipe:
    """A readable, non-seekable stream of `size` random bytes, like a subprocess pipe."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.digest = hashlib.sha256()

    def read(self, amount: int = -1) -> bytes:
        amount = self.left if amount < 0 else min(amount, self.left)
        block = os.urandom(amount)
        self.left -= amount
        self.digest.update(block)
        return block


async def test_a_200_mb_file_streams_up_and_back_intact_in_bounded_memory(
    storage: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    size = 200 * MiB
    source, target = tmp_path / "model.bin", tmp_path / "back" / "model.bin"
    target.parent.mkdir()
    expected = await asyncio.to_thread(write_random_file, source, size)

    try:
        tracemalloc.start()
        try:
            await storage.upload_file(source, s3_bucket, "ckpt/model.bin")
            await storage.download_file(s3_bucket, "ckpt/model.bin", target)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

        assert peak < 64 * MiB, f"peak Python memory {peak / MiB:.0f} MiB for a 200 MiB object"
        assert await asyncio.to_thread(sha256_of, target) == expected
        info = await storage.head(s3_bucket, "ckpt/model.bin")
        assert info.size == size
        # An ETag ending in -<parts> is S3's mark of a multipart upload.
        assert info.etag.endswith(f"-{math.ceil(size / DEFAULT_CHUNK_SIZE)}")
        assert os.listdir(target.parent) == ["model.bin"]  # no temporary file left beside it
    finally:
        # pytest keeps the last runs' temporary directories: do not leave 400 MB in each.
        source.unlink(missing_ok=True)
        target.unlink(missing_ok=True)


async def test_a_non_seekable_stream_uploads_in_parts(storage: Storage, s3_bucket: str) -> None:
    pipe = Pipe(3 * DEFAULT_CHUNK_SIZE + 123)
    await storage.upload_stream(pipe, s3_bucket, "logs/stdout.txt", content_type="text/plain")

    data = await storage.get_bytes(s3_bucket, "logs/stdout.txt")
    assert hashlib.sha256(data).hexdigest() == pipe.digest.hexdigest()
    info = await storage.head(s3_bucket, "logs/stdout.txt")
    assert info.etag.endswith("-4")
    assert info.content_type == "text/plain"


async def test_small_objects_put_get_list_and_delete(storage: Storage, s3_bucket: str) -> None:
    await storage.put_bytes(
        s3_bucket, "runs/r1/a.json", b"{}", content_type="application/json", metadata={"run": "r1"}
    )
    await storage.put_bytes(s3_bucket, "runs/r1/b.txt", b"hello")
    await storage.put_bytes(s3_bucket, "runs/r2/c.txt", b"other run")

    assert await storage.get_bytes(s3_bucket, "runs/r1/b.txt") == b"hello"
    assert [key async for key in storage.list_keys(s3_bucket, "runs/r1/")] == [
        "runs/r1/a.json",
        "runs/r1/b.txt",
    ]
    info = await storage.head(s3_bucket, "runs/r1/a.json")
    assert (info.size, info.content_type, dict(info.metadata)) == (
        2,
        "application/json",
        {"run": "r1"},
    )

    await storage.delete(s3_bucket, "runs/r1/b.txt")
    await storage.delete(s3_bucket, "runs/r1/b.txt")  # deleting twice is fine, as in S3
    assert not await storage.exists(s3_bucket, "runs/r1/b.txt")
    assert await storage.exists(s3_bucket, "runs/r1/a.json")
    assert [key async for key in storage.list_keys(s3_bucket)] == [
        "runs/r1/a.json",
        "runs/r2/c.txt",
    ]


async def test_ensure_bucket_is_idempotent_and_delete_bucket_empties_it(storage: Storage) -> None:
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    await storage.ensure_bucket(bucket)
    await storage.ensure_bucket(bucket)
    await storage.put_bytes(bucket, "x", b"1")

    await storage.delete_bucket(bucket)
    with pytest.raises(NotFound, match=bucket):
        await storage.put_bytes(bucket, "x", b"1")


async def test_missing_objects_and_buckets_raise_not_found_naming_them(
    storage: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    with pytest.raises(NotFound, match=f"s3://{s3_bucket}/nope.bin"):
        await storage.get_bytes(s3_bucket, "nope.bin")
    with pytest.raises(NotFound, match=f"s3://{s3_bucket}/nope.bin"):
        await storage.head(s3_bucket, "nope.bin")
    with pytest.raises(NotFound, match=f"s3://{s3_bucket}/nope.bin"):
        await storage.download_file(s3_bucket, "nope.bin", tmp_path / "nope.bin")
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary file
    with pytest.raises(NotFound, match="no-such-bucket-here"):
        await storage.get_bytes("no-such-bucket-here", "key")
    with pytest.raises(NotFound, match="no-such-bucket-here"):
        _ = [key async for key in storage.list_keys("no-such-bucket-here")]


async def test_a_cancelled_download_stops_and_leaves_no_file_behind(
    storage: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    await storage.upload_stream(Pipe(3 * DEFAULT_CHUNK_SIZE), s3_bucket, "big.bin")
    target = tmp_path / "out" / "big.bin"

    download = asyncio.create_task(storage.download_file(s3_bucket, "big.bin", target))
    await asyncio.sleep(0)  # the download has begun: temporary file created, transfer submitted
    download.cancel()
    with pytest.raises(asyncio.CancelledError):
        await download

    assert os.listdir(target.parent) == []
    # The client is still usable: the cancelled transfer released its threads.
    await storage.download_file(s3_bucket, "big.bin", target)
    assert target.stat().st_size == 3 * DEFAULT_CHUNK_SIZE


async def test_presigned_urls_work_with_a_plain_http_client(
    storage: Storage, s3_bucket: str
) -> None:
    await storage.put_bytes(s3_bucket, "report.html", b"<h1>A/B</h1>")
    get_url = await storage.presigned_url(s3_bucket, "report.html", expires=60)
    put_url = await storage.presigned_url(s3_bucket, "upload.bin", method="put")

    def fetch() -> bytes:
        with urllib.request.urlopen(get_url, timeout=10) as response:
            return bytes(response.read())

    def upload() -> int:
        request = urllib.request.Request(put_url, data=b"from a browser", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)

    assert await asyncio.to_thread(fetch) == b"<h1>A/B</h1>"
    assert await asyncio.to_thread(upload) == 200
    assert await storage.get_bytes(s3_bucket, "upload.bin") == b"from a browser"


async def test_wrong_credentials_raise_a_config_error(s3_server: S3Settings) -> None:
    wrong = s3_server.model_copy(update={"s3_access_key": "intruder"})
    async with Storage(wrong, max_attempts=1) as storage:
        with pytest.raises(ConfigError, match="CIUIC_S3_ACCESS_KEY"):
            await storage.get_bytes("any-bucket", "key")


async def test_an_unreachable_endpoint_raises_unavailable() -> None:
    settings = S3Settings(s3_endpoint=f"http://127.0.0.1:{free_port()}")
    async with Storage(settings, max_attempts=1, connect_timeout=1) as storage:
        with pytest.raises(Unavailable, match="cannot be reached"):
            await storage.get_bytes("any-bucket", "key")


@pytest.mark.slow
async def test_objects_survive_a_server_restart(tmp_path: Path) -> None:
    server = S3Server(data_dir=tmp_path / "data", port=free_s3_port())
    proc = ServerProcess(server, tmp_path / "s3.log")
    await asyncio.to_thread(proc.start)
    try:
        async with Storage(server.client_settings()) as storage:
            await storage.ensure_bucket("durable")
            await storage.put_bytes("durable", "kept.txt", b"still here")
        await asyncio.to_thread(proc.stop)
        await asyncio.to_thread(proc.start)
        async with Storage(server.client_settings()) as storage:
            assert await storage.get_bytes("durable", "kept.txt") == b"still here"
    finally:
        await asyncio.to_thread(proc.stop)
        server.remove_stale_sockets()
