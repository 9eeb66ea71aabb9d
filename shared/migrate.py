"""Versioned SQL migrations: ``python -m shared.migrate``.

Files ``shared/migrations/NNNN_name.sql`` are applied in order, each in its own transaction, and recorded in
``schema_migrations``. A session-level advisory lock makes concurrent runs (several workers starting at once,
a migrate container) safe: the second waits, then finds nothing left to do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from importlib import resources

import asyncpg

from shared.cli import CONNECT_TIMEOUT, StartupError, entry_point_parser, fail, load_settings_or_exit, starting
from shared.logs import configure_logging

log = logging.getLogger("shared.migrate")

# Arbitrary constant shared by every process of this service ("crm-migrate").
MIGRATION_LOCK_ID = 0x63726D2D6D6967


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) for every migration shipped with the package, in order."""
    folder = resources.files("shared") / "migrations"
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")), key=lambda entry: entry.name
    )
    return [(entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8")) for entry in files]


async def apply_migrations(conn: asyncpg.Connection) -> list[str]:
    """Apply every pending migration on ``conn``; return the versions applied now."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    text PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            log.info("applied migration %s", version)
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied_now


async def migrate(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url, timeout=CONNECT_TIMEOUT)
    try:
        return await apply_migrations(conn)
    finally:
        await conn.close()


DESCRIPTION = """\
Apply the pending SQL migrations shipped in shared/migrations to the database at DATABASE_URL, each in
its own transaction, recorded in schema_migrations. Safe to run concurrently and repeatedly (a second
run waits for the first, then finds nothing to do). Prints the versions applied."""


def main(argv: Sequence[str] | None = None) -> None:
    entry_point_parser("python -m shared.migrate", DESCRIPTION).parse_args(argv)
    settings = load_settings_or_exit()
    configure_logging(settings, "migrate")
    try:
        applied = asyncio.run(_migrate_or_explain(settings.database_url))
    except StartupError as exc:
        fail(f"migration failed: {exc}")
    print(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")


async def _migrate_or_explain(database_url: str) -> list[str]:
    with starting("PostgreSQL", database_url):
        return await migrate(database_url)


if __name__ == "__main__":
    main()
