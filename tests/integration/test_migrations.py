"""The migration runner against a real PostgreSQL: ordered, recorded, forward-only, and safe
when replicas start at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import asyncpg
import pytest

from ciuic_common.db import Database, MigrationError

pytestmark = pytest.mark.postgres


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


MIGRATIONS = {
    "001_init.sql": "CREATE TABLE runs (id text PRIMARY KEY, state text NOT NULL);",
    # Slow on purpose, so that concurrent starts overlap inside the runner.
    "002_slow.sql": "SELECT pg_sleep(0.5); ALTER TABLE runs ADD COLUMN started_at timestamptz;",
    "003_index.sql": "CREATE INDEX runs_state ON runs (state);",
}

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from ciuic_common.db import Database

    async def main():
        db = Database(sys.argv[1], "sched")
        await db.connect()
        applied = await db.migrate(("sched", Path(sys.argv[2])))
        print(len(applied))
        await db.close()

    asyncio.run(main())
    """
)


def test_two_processes_migrating_at_once_end_with_one_consistent_schema(
    database_url: str, tmp_path: Path
) -> None:
    directory = write(tmp_path / "migrations", MIGRATIONS)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, database_url, str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    # common's two outbox migrations + our three, applied once in all, by whichever came first
    assert sorted(int(out.split()[-1]) for out, _ in results) == [0, 5]

    async def inspect() -> tuple[list[str], list[tuple[str, int]]]:
        conn = await asyncpg.connect(database_url)
        try:
            columns = await conn.fetch(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = 'sched' AND table_name = 'runs' ORDER BY ordinal_position"
            )
            applied = await conn.fetch(
                "SELECT source, version FROM sched.schema_migrations ORDER BY source, version"
            )
            return [c[0] for c in columns], [(r[0], r[1]) for r in applied]
        finally:
            await conn.close()

    import asyncio

    columns, applied = asyncio.run(inspect())
    assert columns == ["id", "state", "started_at"]
    assert applied == [("common", 1), ("common", 2), ("sched", 1), ("sched", 2), ("sched", 3)]


async def test_a_changed_applied_migration_is_refused(database_url: str, tmp_path: Path) -> None:
    directory = write(tmp_path / "m", {"001_init.sql": "CREATE TABLE t (id int);"})
    db = Database(database_url, "svc")
    await db.connect()
    try:
        assert len(await db.migrate(("svc", directory))) == 3
        assert await db.migrate(("svc", directory)) == [], "a second start applies nothing"
        write(directory, {"001_init.sql": "CREATE TABLE t (id bigint);"})
        with pytest.raises(MigrationError, match="forward-only"):
            await db.migrate(("svc", directory))
    finally:
        await db.close()


async def test_a_failing_migration_leaves_nothing_half_applied(
    database_url: str, tmp_path: Path
) -> None:
    directory = write(
        tmp_path / "m",
        {
            "001_ok.sql": "CREATE TABLE a (id int);",
            "002_bad.sql": "CREATE TABLE b (id int); SELEC 1;",
        },
    )
    db = Database(database_url, "svc")
    await db.connect()
    try:
        with pytest.raises(MigrationError, match=r"svc:002_bad failed"):
            await db.migrate(("svc", directory))
        tables = {
            r[0]
            for r in await db.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'svc'"
            )
        }
        assert tables == {"schema_migrations", "outbox", "outbox_failed", "a"}, (
            "b was rolled back with its file"
        )
    finally:
        await db.close()


def test_badly_named_migration_files_are_reported(tmp_path: Path) -> None:
    from ciuic_common.db import load_migrations

    write(tmp_path, {"1-init.sql": "SELECT 1;"})
    with pytest.raises(MigrationError, match=r"NNN_lower_snake\.sql"):
        load_migrations(tmp_path, "svc")
