"""Migrations on an empty database: they all apply, give the fixed schema, and are safe to run again or at once.

Each test gets a database of its own, created empty (not the suite's migrated one) and dropped at the end even
when the test fails.
"""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg

from shared.migrate import migrate, migration_files
from tests.support import ROOT

# The columns of DEVELOPERS.md's customers table, plus field_stamps (per-field write stamps, see README).
# A new column is a deliberate schema change: add it here in the same commit.
CUSTOMER_COLUMNS = {
    "id": "bigint",
    "user_id": "text",
    "bot_id": "text",
    "nickname": "text",
    "name": "text",
    "phone": "text",
    "backup_phone": "text",
    "wechat": "text",
    "status": "smallint",
    "community": "text",
    "business_type": "text",
    "room_type": "text",
    "room_tags": "jsonb",
    "move_in_date": "date",
    "lease_period": "integer",
    "price_range": "text",
    "source_channel": "text",
    "creator": "text",
    "internal_notes": "text",
    "field_stamps": "jsonb",
    "created_at": "timestamp with time zone",
    "updated_at": "timestamp with time zone",
}
CONCURRENT_MIGRATORS = 4


async def applied_versions(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    return [row["version"] for row in rows]


def shipped_versions() -> list[str]:
    return [version for version, _ in migration_files()]


async def test_every_migration_applies_on_an_empty_database(empty_database: str) -> None:
    assert shipped_versions(), "no migrations found in shared/migrations"
    assert await migrate(empty_database) == shipped_versions()
    assert await applied_versions(empty_database) == shipped_versions()


async def test_customers_table_has_exactly_the_fixed_columns(empty_database: str) -> None:
    await migrate(empty_database)
    conn = await asyncpg.connect(empty_database)
    try:
        rows = await conn.fetch(
            """
            SELECT column_name, data_type
              FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = 'customers'
            """
        )
    finally:
        await conn.close()
    assert {row["column_name"]: row["data_type"] for row in rows} == CUSTOMER_COLUMNS


async def test_only_user_id_and_the_main_phone_are_unique(empty_database: str) -> None:
    """userId is the upsert key; phone is unique across customers, backup_phone is not."""
    await migrate(empty_database)
    conn = await asyncpg.connect(empty_database)
    try:
        rows = await conn.fetch(
            """
            SELECT array_agg(a.attname::text ORDER BY a.attname) AS columns
              FROM pg_index i
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
             WHERE i.indrelid = 'customers'::regclass AND i.indisunique
             GROUP BY i.indexrelid
            """
        )
    finally:
        await conn.close()
    assert sorted(tuple(row["columns"]) for row in rows) == [("id",), ("phone",), ("user_id",)]


async def test_running_migrate_twice_is_a_no_op(empty_database: str) -> None:
    await migrate(empty_database)
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute("INSERT INTO customers (user_id, phone) VALUES ('migrate-twice', '13800000000')")
        before = await conn.fetch("SELECT version, applied_at FROM schema_migrations ORDER BY version")

        assert await migrate(empty_database) == []

        after = await conn.fetch("SELECT version, applied_at FROM schema_migrations ORDER BY version")
        kept = await conn.fetchval("SELECT phone FROM customers WHERE user_id = 'migrate-twice'")
    finally:
        await conn.close()
    assert [tuple(row) for row in after] == [tuple(row) for row in before]
    assert kept == "13800000000", "a second run must not touch existing data"


async def test_concurrent_migrate_processes_apply_each_migration_once(empty_database: str) -> None:
    """Several `python -m shared.migrate` at once (e.g. workers starting together): the advisory lock
    serialises them, one applies everything, the others find nothing left and still exit 0."""
    env = {**os.environ, "DATABASE_URL": empty_database}

    async def run_migrate() -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shared.migrate", cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode is not None
        return process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")

    results = await asyncio.gather(*(run_migrate() for _ in range(CONCURRENT_MIGRATORS)))

    for returncode, stdout, stderr in results:
        assert returncode == 0, stdout + stderr
    assert await applied_versions(empty_database) == shipped_versions()
    # Each process prints "migrations applied: <versions>" or "... none (up to date)": every version must be
    # named by exactly one of them.
    reported = [version for _, stdout, _ in results for version in versions_reported(stdout)]
    assert sorted(reported) == shipped_versions(), [stdout for _, stdout, _ in results]


def versions_reported(stdout: str) -> list[str]:
    """The versions a `python -m shared.migrate` run says it applied."""
    prefix = "migrations applied: "
    lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, stdout
    applied = lines[0].removeprefix(prefix)
    return [] if applied.startswith("none") else applied.split(", ")
