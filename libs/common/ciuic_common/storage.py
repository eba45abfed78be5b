"""Objects in S3 (AWS or any S3-compatible server) through boto3.

boto3 blocks, so every call runs in a small thread pool of its own and the event loop never
waits on the network. Large files stream in multipart chunks: neither uploads nor downloads hold a
whole object in memory. botocore's errors become `ciuic_common.errors` naming the bucket and key.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, cast

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    ParamValidationError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError
from s3transfer.futures import TransferFuture

from ciuic_common.errors import (
    AlreadyExists,
    CiuicError,
    ConfigError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from ciuic_common.settings import S3Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ListObjectsV2OutputTypeDef, ObjectIdentifierTypeDef

__all__ = ["ObjectInfo", "Readable", "S3Url", "Storage", "StorageError", "bucket_name_problem"]

_T = TypeVar("_T")

MiB = 1024 * 1024
#: Multipart part size. Memory in flight is about part size x concurrency; s3transfer grows the
#: part size itself when an object would need more than S3's 10,000 parts.
DEFAULT_CHUNK_SIZE = 8 * MiB
#: `get_bytes` refuses objects above this size; stream them with `download_file` instead.
DEFAULT_MAX_BYTES = 64 * MiB

# S3's bucket naming rules: 3-63 characters of lowercase letters, digits, dots and hyphens,
# starting and ending with a letter or digit, no "..", and not shaped like an IP address.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_ADDRESS = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_MAX_KEY_BYTES = 1024

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch"}
_INVALID = {"InvalidBucketName", "KeyTooLongError", "InvalidArgument", "InvalidRequest"}
_BUSY = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}


class Readable(Protocol):
    """A binary stream to upload: a file, a pipe, a socket's makefile(), a response body."""

    def read(self, size: int = -1, /) -> bytes: ...


class StorageError(CiuicError):
    """S3 refused an operation for a reason none of the general errors describes."""


def bucket_name_problem(bucket: str) -> str | None:
    """Why `bucket` is not a valid S3 bucket name, or None when it is."""
    if not _BUCKET.match(bucket):
        return (
            "a bucket name has 3-63 lowercase letters, digits, dots or hyphens, "
            "and starts and ends with a letter or digit"
        )
    if ".." in bucket:
        return "a bucket name has no two adjacent dots"
    if _IP_ADDRESS.match(bucket):
        return "a bucket name is not shaped like an IP address"
    return None


@dataclass(frozen=True)
class S3Url:
    """`s3://bucket/key`: a bucket and a key, or a key prefix (possibly empty)."""

    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Url:
        """Split `s3://bucket[/key]`; raise InvalidArgument naming what is wrong."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() != "s3":
            raise InvalidArgument(f"{url!r} is not an S3 URL: expected s3://BUCKET[/PREFIX]")
        # Everything after the bucket is the key, verbatim: keys may hold '?', '#' and '%'.
        bucket, _, key = rest.partition("/")
        problem = bucket_name_problem(bucket)
        if problem is not None:
            raise InvalidArgument(f"{url!r}: {bucket!r} is not a valid bucket name: {problem}")
        if len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES:
            raise InvalidArgument(f"{url!r}: the key is longer than {_MAX_KEY_BYTES} bytes")
        return cls(bucket, key)

    def join(self, *parts: str) -> S3Url:
        """This URL with `parts` appended to the key, one '/' between each."""
        segments = [self.key.rstrip("/")] if self.key.rstrip("/") else []
        segments += [part.strip("/") for part in parts if part.strip("/")]
        return S3Url(self.bucket, "/".join(segments))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class ObjectInfo:
    """What S3 knows about one object (HEAD)."""

    bucket: str
    key: str
    size: int
    #: Without quotes; multipart uploads end in `-<parts>` and are not an MD5 of the content.
    etag: str
    content_type: str | None
    last_modified: datetime
    metadata: Mapping[str, str] = field(default_factory=dict)


class Storage:
    """Async S3 operations on one endpoint; build once per process and `close()` at shutdown."""

    def __init__(
        self,
        settings: S3Settings,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_concurrency: int = 4,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        self.endpoint = settings.s3_endpoint
        self._client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint or None,  # empty: AWS itself
            aws_access_key_id=settings.s3_access_key,
            aws_secret_access_key=settings.s3_secret_key.get_secret_value(),
            region_name=settings.s3_region,
            config=Config(
                signature_version="s3v4",
                # Local servers have no DNS name per bucket.
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "total_max_attempts": max_attempts},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_pool_connections=2 * max_concurrency + 4,
            ),
        )
        self._region = settings.s3_region
        transfer = TransferConfig(
            multipart_threshold=chunk_size,
            multipart_chunksize=chunk_size,
            max_concurrency=max_concurrency,
            # The CRT client would pick its own part sizes and concurrency.
            preferred_transfer_client="classic",
        )
        # Streams that cannot seek are buffered part by part; bound how many parts wait.
        transfer.max_in_memory_upload_chunks = max_concurrency
        self._transfers = create_transfer_manager(self._client, transfer)
        # Threads that make plain calls and wait on transfers; the parts of a transfer move in
        # the transfer manager's own `max_concurrency` threads.
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ciuic-s3")

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Wait for transfers in flight, then release the threads and connections."""
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._transfers.shutdown()
        self._executor.shutdown(wait=True)
        self._client.close()

    async def ensure_bucket(self, bucket: str) -> None:
        """Create `bucket` unless it exists already (ours)."""
        problem = bucket_name_problem(bucket)
        if problem is not None:
            raise InvalidArgument(f"{bucket!r} is not a valid bucket name: {problem}")
        try:
            await self._call(partial(self._client.head_bucket, Bucket=bucket), bucket)
            return
        except NotFound:
            pass
        extra: dict[str, Any] = {}
        if self._region != "us-east-1":
            # AWS creates buckets in us-east-1 unless told otherwise.
            extra["CreateBucketConfiguration"] = {"LocationConstraint": self._region}

        def create() -> None:
            try:
                self._client.create_bucket(Bucket=bucket, **extra)
            except ClientError as exc:
                # A concurrent caller created it first: that is what we wanted.
                if _error_code(exc) != "BucketAlreadyOwnedByYou":
                    raise

        await self._call(create, bucket)

    async def delete_bucket(self, bucket: str) -> None:
        """Delete every object in `bucket`, then the bucket."""
        batch: list[str] = []
        async for key in self.list_keys(bucket):
            batch.append(key)
            if len(batch) == 1000:  # the most one DeleteObjects request takes
                await self._delete_keys(bucket, batch)
                batch = []
        if batch:
            await self._delete_keys(bucket, batch)
        await self._call(partial(self._client.delete_bucket, Bucket=bucket), bucket)

    async def _delete_keys(self, bucket: str, keys: list[str]) -> None:
        objects: list[ObjectIdentifierTypeDef] = [{"Key": key} for key in keys]
        response = await self._call(
            partial(self._client.delete_objects, Bucket=bucket, Delete={"Objects": objects}),
            bucket,
        )
        failed = response.get("Errors", [])
        if failed:
            first = failed[0]
            raise StorageError(
                f"S3 did not delete {len(failed)} objects in bucket {bucket!r}, e.g. "
                f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
            )

    async def upload_file(
        self,
        path: str | os.PathLike[str],
        bucket: str,
        key: str,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Stream the local file `path` to `bucket/key` (multipart when large)."""
        extra = _put_args(content_type, metadata)
        await self._transfer(
            lambda: self._transfers.upload(os.fspath(path), bucket, key, extra), bucket, key
        )

    async def upload_stream(
        self,
        fileobj: Readable,
        bucket: str,
        key: str,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Stream a readable binary file object to `bucket/key`, part by part as it reads."""
        extra = _put_args(content_type, metadata)
        await self._transfer(
            lambda: self._transfers.upload(cast(Any, fileobj), bucket, key, extra), bucket, key
        )

    async def download_file(self, bucket: str, key: str, path: str | os.PathLike[str]) -> Path:
        """Stream `bucket/key` to `path`, which appears only once the download is complete."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A temporary file beside the target, so that the final rename is atomic (and, unlike
        # mkstemp's, created with the usual permissions).
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            with temporary.open("xb") as out:
                await self._transfer(
                    lambda: self._transfers.download(bucket, key, out), bucket, key
                )
            temporary.replace(target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return target

    async def put_bytes(
        self,
        bucket: str,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Store a small object in one request."""
        extra = _put_args(content_type, metadata)
        await self._call(
            partial(self._client.put_object, Bucket=bucket, Key=key, Body=data, **extra),
            bucket,
            key,
        )

    async def get_bytes(
        self, bucket: str, key: str, *, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> bytes:
        """The content of a small object; InvalidArgument when it exceeds `max_bytes`."""

        def read() -> bytes:
            response = self._client.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            with contextlib.closing(body):
                if response["ContentLength"] > max_bytes:
                    raise InvalidArgument(
                        f"s3://{bucket}/{key} holds {response['ContentLength']} bytes, more than "
                        f"get_bytes reads ({max_bytes}); use download_file"
                    )
                return body.read()

        return await self._call(read, bucket, key)

    async def head(self, bucket: str, key: str) -> ObjectInfo:
        """Size, ETag, content type and metadata of `bucket/key`; NotFound when missing."""
        response = await self._call(
            partial(self._client.head_object, Bucket=bucket, Key=key), bucket, key
        )
        return ObjectInfo(
            bucket=bucket,
            key=key,
            size=response["ContentLength"],
            etag=response["ETag"].strip('"'),
            content_type=response.get("ContentType"),
            last_modified=response["LastModified"],
            metadata=dict(response.get("Metadata", {})),
        )

    async def exists(self, bucket: str, key: str) -> bool:
        """True when `bucket/key` exists."""
        try:
            await self.head(bucket, key)
        except NotFound:
            return False
        return True

    async def delete(self, bucket: str, key: str) -> None:
        """Delete `bucket/key`; deleting a missing key is not an error (as in S3)."""
        await self._call(partial(self._client.delete_object, Bucket=bucket, Key=key), bucket, key)

    async def list_keys(self, bucket: str, prefix: str = "") -> AsyncIterator[str]:
        """Every key in `bucket` that starts with `prefix`, in order, a page at a time."""
        paginator = self._client.get_paginator("list_objects_v2")
        pages: Iterator[ListObjectsV2OutputTypeDef] = iter(
            paginator.paginate(Bucket=bucket, Prefix=prefix)
        )
        while True:
            page = await self._call(partial(next, pages, None), bucket, prefix or None)
            if page is None:
                return
            for item in page.get("Contents", []):
                yield item["Key"]

    async def presigned_url(
        self,
        bucket: str,
        key: str,
        *,
        method: Literal["get", "put"] = "get",
        expires: int = 3600,
    ) -> str:
        """A URL that lets anyone GET (or PUT) `bucket/key` for `expires` seconds."""
        if not 1 <= expires <= 7 * 24 * 3600:
            raise InvalidArgument(f"expires must be 1 s to 7 days (SigV4), not {expires} s")
        operation = {"get": "get_object", "put": "put_object"}[method]
        # Signing is local computation: no request, no thread needed.
        return self._client.generate_presigned_url(
            operation, Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
        )

    async def _call(self, fn: Callable[[], _T], bucket: str, key: str | None = None) -> _T:
        """Run a blocking boto3 call in the pool; translate its errors."""
        loop = asyncio.get_running_loop()
        # Carry contextvars (log context) into the thread, as asyncio.to_thread does.
        context = contextvars.copy_context()
        try:
            return await loop.run_in_executor(self._executor, context.run, fn)
        except (BotoCoreError, ClientError, RetriesExceededError) as exc:
            raise _translate(exc, self.endpoint, bucket, key) from exc

    async def _transfer(self, start: Callable[[], TransferFuture], bucket: str, key: str) -> None:
        """Run a managed (multipart) transfer; cancelling the caller cancels the transfer."""
        future = start()
        waiter = asyncio.ensure_future(self._call(future.result, bucket, key))
        try:
            await asyncio.shield(waiter)
        except asyncio.CancelledError:
            future.cancel()
            # Let its threads finish with the file before the caller closes or removes it.
            with contextlib.suppress(BaseException):
                await waiter
            raise


def _put_args(content_type: str | None, metadata: Mapping[str, str] | None) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if content_type is not None:
        extra["ContentType"] = content_type
    if metadata:
        extra["Metadata"] = dict(metadata)
    return extra


def _error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def _translate(exc: Exception, endpoint: str, bucket: str, key: str | None) -> CiuicError:
    """The ciuic error for a botocore/s3transfer failure on `bucket`/`key`."""
    where = f"s3://{bucket}/{key}" if key is not None else f"bucket {bucket!r}"
    if isinstance(exc, RetriesExceededError):
        return Unavailable(f"S3 at {endpoint}: {where} failed after retries: {exc.last_exception}")
    if isinstance(exc, ParamValidationError):
        return InvalidArgument(f"{where}: {exc}")
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return Unavailable(f"S3 at {endpoint} cannot be reached ({where}): {exc}")
    if not isinstance(exc, ClientError):
        return StorageError(f"S3 at {endpoint} failed on {where}: {exc}")
    code = _error_code(exc)
    message = exc.response.get("Error", {}).get("Message") or code
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code == "NoSuchBucket":
        return NotFound(f"bucket {bucket!r} does not exist at {endpoint}")
    if code in _NOT_FOUND:
        return NotFound(f"{where} does not exist at {endpoint}")
    if code in _BAD_CREDENTIALS:
        return ConfigError(
            f"S3 at {endpoint} rejects the credentials in CIUIC_S3_ACCESS_KEY and "
            f"CIUIC_S3_SECRET_KEY ({code}: {message})"
        )
    if code == "BucketAlreadyExists":
        return AlreadyExists(f"bucket {bucket!r} exists already and belongs to someone else")
    if code in _INVALID:
        return InvalidArgument(f"{where}: {message}")
    if code in _BUSY or status >= 500:
        return Unavailable(f"S3 at {endpoint} failed on {where} after retries: {code}: {message}")
    return StorageError(
        f"S3 at {endpoint} refused {exc.operation_name} on {where}: {code}: {message}"
    )
