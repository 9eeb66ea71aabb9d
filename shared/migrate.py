"""Versioned SQL migrations: ``python -m shared.migrate``.

Files ``shared/migrations/NNNN_name.sql`` are applied in order, each in its own transaction, and recorded in
``schema_migrations``. A session-level advisory lock makes concurrent runs (several workers starting at once,
a migrate container) safe: the second waits, then finds nothing left to do.

``--create-roles`` then creates the processes' own PostgreSQL roles and grants them their rights on this
database (``shared.roles``): the compose file's migrate service runs it as the owner, the others connect as them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from importlib import resources

import asyncpg

from shared.cli import StartupError, entry_point_parser, fail, load_settings_or_exit, starting
from shared.logs import configure_logging
from shared.roles import RoleResult, create_roles
from shared.settings import CONNECT_TIMEOUT, Settings

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
        # Only when missing: even CREATE TABLE IF NOT EXISTS needs CREATE on the schema, which the worker's
        # role (shared/roles.py) has not; with the schema up to date, such a role passes through here.
        if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
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
            try:
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            except asyncpg.InsufficientPrivilegeError as exc:
                user = await conn.fetchval("SELECT current_user")
                raise StartupError(
                    f"migration {version} is pending but role {user} may not apply it ({exc}): run "
                    "`python -m shared.migrate` as the database owner (with a role of its own, set "
                    "MIGRATE_ON_START=false)") from exc
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

ROLES_NOTES = """\
--create-roles: after migrating, create the PostgreSQL roles <DB_ROLE_PREFIX>worker, ...gateway and
...replay if missing (LOGIN, no superuser, no CREATEDB/CREATEROLE), set their passwords from
CRM_WORKER_PASSWORD / CRM_GATEWAY_PASSWORD / CRM_REPLAY_PASSWORD when set, and grant each exactly its
rights on this database (shared/roles.py). Run it as the database owner; safe to repeat, and for several
databases of one cluster."""


def main(argv: Sequence[str] | None = None) -> None:
    parser = entry_point_parser("python -m shared.migrate", DESCRIPTION, ROLES_NOTES, reads="migrate")
    parser.add_argument("--create-roles", action="store_true",
                        help="also create the application's roles and grant their rights (see below)")
    args = parser.parse_args(argv)
    settings = load_settings_or_exit()
    configure_logging(settings, "migrate")
    try:
        applied, roles = asyncio.run(_migrate_or_explain(settings, create=args.create_roles))
    except StartupError as exc:
        fail(f"migration failed: {exc}")
    print(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")
    if args.create_roles:
        print(f"roles granted on this database: {', '.join(role.describe() for role in roles)}")


async def _migrate_or_explain(settings: Settings, *, create: bool) -> tuple[list[str], list[RoleResult]]:
    with starting("PostgreSQL", settings.database_url):
        conn = await asyncpg.connect(settings.database_url, timeout=CONNECT_TIMEOUT)
        try:
            applied = await apply_migrations(conn)
            roles = await create_roles(conn, _passwords(settings), settings.db_role_prefix) if create else []
        finally:
            await conn.close()
    return applied, roles


def _passwords(settings: Settings) -> dict[str, str | None]:
    secrets = {"worker": settings.crm_worker_password, "gateway": settings.crm_gateway_password,
               "replay": settings.crm_replay_password}
    return {component: None if secret is None else secret.get_secret_value() for component, secret in secrets.items()}


if __name__ == "__main__":
    main()
