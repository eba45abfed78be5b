"""PostgreSQL through asyncpg: a pool per service, transactions, and the migration runner.

Each service owns one schema. Its migrations are numbered, forward-only SQL files
(`migrations/001_init.sql`) applied in order at start; `<schema>.schema_migrations` records what
ran, with a checksum so an edited, already-applied file is caught instead of silently skipped.
A PostgreSQL advisory lock makes concurrent starts (two replicas) apply each file exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

from ciuic_common.errors import CiuicError, ConfigError, Unavailable
from ciuic_common.logging import get_logger

__all__ = [
    "Connection",
    "Database",
    "Migration",
    "MigrationError",
    "apply_migrations",
    "ensure_database",
    "load_migrations",
]

log = get_logger(__name__)

#: A connection as handlers see it: a pooled one (inside `Database.transaction`) or a plain one.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

COMMON_MIGRATIONS = Path(__file__).parent / "migrations"
_NAME = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


class MigrationError(CiuicError):
    """A migration file is malformed, edited after being applied, or failed to apply."""


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file of one source (`common` for ciuic_common's, else the service's)."""

    source: str
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.source}:{self.version:03d}_{self.name}"


def load_migrations(directory: Path, source: str) -> list[Migration]:
    """The migrations in `directory`, ordered by number; a badly named file is an error."""
    if not directory.is_dir():
        return []
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(
                f"{path}: migration files are named NNN_lower_snake.sql (e.g. 001_init.sql)"
            )
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path}: number {version} is used twice in {directory}")
        found[version] = Migration(source, version, match.group(2), path.read_text())
    return [found[v] for v in sorted(found)]


def _quote(identifier: str) -> str:
    if not _IDENT.match(identifier):
        raise ConfigError(f"{identifier!r} is not a valid schema name (lower_snake_case)")
    return f'"{identifier}"'


async def apply_migrations(
    conn: Connection, schema: str, migrations: Sequence[Migration]
) -> list[Migration]:
    """Apply the migrations not yet applied to `schema`, each in its own transaction.

    Safe to call from several processes at once: they serialise on an advisory lock.
    Returns the migrations this call applied.
    """
    quoted = _quote(schema)
    lock_key = f"ciuic.migrations.{schema}"
    await conn.execute("SELECT pg_advisory_lock(hashtext($1))", lock_key)
    try:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {quoted}.schema_migrations (
                   source text NOT NULL,
                   version integer NOT NULL,
                   name text NOT NULL,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now(),
                   PRIMARY KEY (source, version))"""
        )
        rows = await conn.fetch(
            f"SELECT source, version, name, checksum FROM {quoted}.schema_migrations"
        )
        applied = {(r["source"], r["version"]): r for r in rows}
        done: list[Migration] = []
        for migration in migrations:
            previous = applied.get((migration.source, migration.version))
            if previous is not None:
                if previous["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"{migration.label} was changed after it was applied to schema {schema}; "
                        "migrations are forward-only: add a new numbered file instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(f"SET LOCAL search_path TO {quoted}, public")
                try:
                    await conn.execute(migration.sql)
                except asyncpg.PostgresError as exc:
                    raise MigrationError(
                        f"{migration.label} failed in schema {schema}: {exc}"
                    ) from exc
                await conn.execute(
                    f"INSERT INTO {quoted}.schema_migrations (source, version, name, checksum)"
                    " VALUES ($1, $2, $3, $4)",
                    migration.source,
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            log.info("migration_applied", schema=schema, migration=migration.label)
            done.append(migration)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", lock_key)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


async def ensure_database(url: str) -> None:
    """Create the database named in `url` when it does not exist (connects to `postgres`)."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name:
        raise ConfigError(f"the database URL {url!r} names no database")
    admin = urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(admin, timeout=10)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            # Another process may create it between our check and our create.
            with contextlib.suppress(asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    # jsonb and json columns come back as Python objects, and go in from them.
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class Database:
    """A service's connection pool, with its schema first on the search path."""

    def __init__(self, url: str, schema: str, *, min_size: int = 1, max_size: int = 10) -> None:
        self.url = url
        self.schema = schema
        self._quoted = _quote(schema)
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("Database.connect() has not been awaited")
        return self._pool

    async def connect(self) -> None:
        """Open the pool (creating the database when missing)."""
        try:
            await ensure_database(self.url)
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self._min_size,
                max_size=self._max_size,
                server_settings={"search_path": f"{self.schema}, public"},
                init=_init_connection,
                timeout=10,
                command_timeout=60,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise Unavailable(
                f"cannot connect to PostgreSQL at {redact(self.url)} for schema {self.schema}: "
                f"{exc}; check CIUIC_DATABASE_URL and that the server runs"
            ) from exc

    async def migrate(self, *directories: tuple[str, Path]) -> list[Migration]:
        """Apply ciuic_common's migrations, then each (source, directory) given."""
        migrations = load_migrations(COMMON_MIGRATIONS, "common")
        for source, directory in directories:
            migrations += load_migrations(directory, source)
        async with self.pool.acquire() as conn:
            return await apply_migrations(conn, self.schema, migrations)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A connection inside a transaction: committed on success, rolled back on error."""
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection without a transaction (for LISTEN and single statements)."""
        async with self.pool.acquire() as conn:
            yield conn

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(query, *args))

    async def execute(self, query: str, *args: Any) -> str:
        return str(await self.pool.execute(query, *args))

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
