"""Least privilege in PostgreSQL: the role of each process and exactly its grants (the RabbitMQ side, one user per
component, is ``deploy/rabbitmq/permissions.py``).

``python -m shared.migrate --create-roles`` applies the migrations as the database owner, then ``create_roles``:

    1. (cluster-wide)  CREATE ROLE <prefix>worker / gateway / replay — LOGIN, no superuser, no CREATEDB, no
                       CREATEROLE, no replication, no BYPASSRLS — when missing; an existing role of that name
                       gets those attributes back. CRM_<NAME>_PASSWORD, when set, becomes its password.
    2. (this database) REVOKE CREATE ON SCHEMA public FROM PUBLIC (databases made before PostgreSQL 15 still
                       let every role create tables there); then, per role, revoke every table and sequence
                       privilege it holds here and grant exactly ``TABLE_GRANTS`` / ``SEQUENCE_GRANTS``, plus
                       CONNECT on the database and USAGE on schema public. All in one transaction.

Roles are cluster-wide and grants are per database, so running it for several databases, again, or at the same
time is safe: an advisory lock serialises runs on one database; runs on two databases may both try to create a
role, and the loser takes the winner's (duplicate_object / unique_violation), or both change it at once ("tuple
concurrently updated"), and the step is retried. Grants are table-level, never column lists: a migration adding
a column (``0003_api_key_name.sql``) needs no new grant; a new *table* needs an entry here, and a re-run.

Passwords never travel as text: the SCRAM-SHA-256 verifier is computed here (what psql's ``\\password`` does), so
neither the server's statement log nor ``pg_stat_activity`` ever holds the password itself, and nothing here logs
it. Role names are quoted with ``format('%I')`` by the server; the verifier with ``format('%L')``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import asyncpg

log = logging.getLogger("shared.roles")

COMPONENTS: Final = ("worker", "gateway", "replay")
DEFAULT_PREFIX: Final = "crm_"
# Arbitrary constant ("crm-role"): serialises --create-roles runs on one database (advisory locks are per
# database, so runs on two databases still meet in the cluster-wide step: see the module docstring).
ROLES_LOCK_ID: Final = 0x63726D2D726F6C65

# Table privileges per component: every statement the process runs, and nothing more.
TABLE_GRANTS: Final[Mapping[str, Mapping[str, tuple[str, ...]]]] = {
    "worker": {
        # worker/repository.py: SELECT_BATCH_STATE; WRITE_BATCH's INSERT ... ON CONFLICT DO UPDATE
        # (which also needs SELECT). Customers are never deleted.
        "customers": ("SELECT", "INSERT", "UPDATE"),
        # SELECT_BATCH_STATE / SELECT_IDEMPOTENCY_KEYS, WRITE_BATCH's INSERT, EXPIRE_IDEMPOTENCY_KEYS' UPDATE,
        # DELETE_EXPIRED_PROCESSED (the retention cleanup).
        "processed_requests": ("SELECT", "INSERT", "UPDATE", "DELETE"),
        # RECORD_FAILURE's upsert (SELECT for ON CONFLICT), DELETE_EXPIRED_FAILED.
        "failed_requests": ("SELECT", "INSERT", "UPDATE", "DELETE"),
        # MIGRATE_ON_START (the default) reads which migrations are applied; it applies none with this role.
        "schema_migrations": ("SELECT",),
        # shared/clock/timeline.py: the first worker to see a new database server records its shift (INSERT ... ON
        # CONFLICT DO NOTHING needs SELECT); WRITE_BATCH raises the high-water mark.
        "clock_epochs": ("SELECT", "INSERT"),
        "clock_high_water": ("SELECT", "UPDATE"),
    },
    "gateway": {
        # gateway/store.py: SELECT_CUSTOMER and SELECT_REQUEST_STATUS, on a read-only pool.
        "customers": ("SELECT",),
        "processed_requests": ("SELECT",),
        "failed_requests": ("SELECT",),
        # shared/clock/timeline.py: every sample reads the server's shift and the high-water mark.
        "clock_epochs": ("SELECT",),
        "clock_high_water": ("SELECT",),
    },
    # The replay tool and the dead-letter console (python -m console): the same statements, worker/dead_letters.py.
    "replay": {
        # worker/repository.py: NEWEST_FIELD_STAMP (replay --force); select_customer_states (the dry run's "fields
        # it would set, fields a newer write holds").
        "customers": ("SELECT",),
        # record_audit's INSERT ... RETURNING id (RETURNING needs SELECT) and the console's audit page. Never
        # UPDATE or DELETE: the audit trail is append-only.
        "dead_letter_audit": ("SELECT", "INSERT"),
        # SELECT_REQUEST_STATUSES: a replayed request's outcome once a worker applied it (and the dry run's
        # "already applied").
        "processed_requests": ("SELECT",),
        # worker/dead_letters.py: dead letters moved out of the queue (INSERT ... ON CONFLICT needs SELECT),
        # listed, and deleted once replayed or dropped.
        "dead_letters": ("SELECT", "INSERT", "DELETE"),
        # shared/clock/timeline.py (replay --force stamps on the shared timeline).
        "clock_epochs": ("SELECT",),
        "clock_high_water": ("SELECT",),
        # record_audit's DELETE ... WHERE request_id = ANY($1): a DELETE with a WHERE needs SELECT too.
        "failed_requests": ("SELECT", "DELETE"),
    },
}

# Sequences behind serial columns ((table, column)): USAGE allows nextval() for the INSERTs above.
SEQUENCE_GRANTS: Final[Mapping[str, tuple[tuple[str, str], ...]]] = {
    "worker": (("customers", "id"),),
    "gateway": (),
    "replay": (("dead_letter_audit", "id"), ("dead_letters", "id")),
}

# Attributes every role must have: (pg_roles column, value wanted, keyword that sets it).
_ATTRIBUTES: Final = (
    ("rolcanlogin", True, "LOGIN"),
    ("rolsuper", False, "NOSUPERUSER"),
    ("rolcreatedb", False, "NOCREATEDB"),
    ("rolcreaterole", False, "NOCREATEROLE"),
    ("rolinherit", False, "NOINHERIT"),
    ("rolreplication", False, "NOREPLICATION"),
    ("rolbypassrls", False, "NOBYPASSRLS"),
)
# Two sessions changing the same pg_authid row at once: PostgreSQL's "tuple concurrently updated" (XX000).
_CONCURRENT_UPDATE: Final = "tuple concurrently updated"
_ATTEMPTS: Final = 5


@dataclass(frozen=True)
class RoleResult:
    role: str
    created: bool
    password_set: bool

    def describe(self) -> str:
        state = "created" if self.created else "existed"
        return f"{self.role} ({state}{', password set' if self.password_set else ''})"


def role_name(component: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}{component}"


async def create_roles(
    conn: asyncpg.Connection, passwords: Mapping[str, str | None] | None = None, prefix: str = DEFAULT_PREFIX
) -> list[RoleResult]:
    """Create the roles if missing, set their passwords when given, grant their rights on this database.

    ``passwords`` maps a component (``worker``, ``gateway``, ``replay``) to its password; a missing or empty
    one leaves the role's password as it is. Tests pass a ``prefix`` of their own (roles are cluster-wide).
    """
    passwords = passwords or {}
    await conn.execute("SELECT pg_advisory_lock($1)", ROLES_LOCK_ID)
    try:
        results = []
        for component in COMPONENTS:
            role = role_name(component, prefix)
            created = await _retry_concurrent(_ensure_role, conn, role)
            password = passwords.get(component)
            if password:
                await _retry_concurrent(_set_password, conn, role, password)
            results.append(RoleResult(role, created, bool(password)))
        async with conn.transaction():
            await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            for component in COMPONENTS:
                await _grant(conn, component, role_name(component, prefix))
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", ROLES_LOCK_ID)
    for result in results:
        log.info("role %s", result.describe())
    return results


async def _retry_concurrent(step: Callable[..., Awaitable[bool]], *args: object) -> bool:
    """``step(*args)``, again when a run on another database changed the same role at the same moment."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return await step(*args)
        except asyncpg.InternalServerError as exc:
            if _CONCURRENT_UPDATE not in str(exc) or attempt == _ATTEMPTS:
                raise
    raise AssertionError("unreachable")


async def _ensure_role(conn: asyncpg.Connection, role: str) -> bool:
    """Create ``role`` if missing (True), else give it back the attributes it must have (False)."""
    columns = ", ".join(column for column, _, _ in _ATTRIBUTES)
    row = await conn.fetchrow(f"SELECT {columns} FROM pg_roles WHERE rolname = $1", role)
    if row is None:
        keywords = " ".join(keyword for _, _, keyword in _ATTRIBUTES)
        try:
            await _execute_formatted(conn, f"CREATE ROLE %I {keywords}", role)
            return True
        except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
            # Created a moment ago by a run on another database (its advisory lock is not ours).
            row = await conn.fetchrow(f"SELECT {columns} FROM pg_roles WHERE rolname = $1", role)
            assert row is not None
    wrong = [keyword for column, wanted, keyword in _ATTRIBUTES if row[column] != wanted]
    if wrong:  # only what differs: changing SUPERUSER at all needs a superuser, even to switch it off
        await _execute_formatted(conn, f"ALTER ROLE %I {' '.join(wrong)}", role)
        log.warning("role %s had other attributes; set %s", role, " ".join(wrong))
    return False


async def _set_password(conn: asyncpg.Connection, role: str, password: str) -> bool:
    await _execute_formatted(conn, "ALTER ROLE %I PASSWORD %L", role, scram_sha256_verifier(password))
    return True


async def _grant(conn: asyncpg.Connection, component: str, role: str) -> None:
    """Exactly the rights of ``component`` on this database: earlier grants on tables and sequences go."""
    await _execute_formatted(conn, "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM %I", role)
    await _execute_formatted(conn, "REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM %I", role)
    await _execute_formatted(conn, "GRANT CONNECT ON DATABASE %I TO %I", await conn.fetchval(
        "SELECT current_database()"), role)
    await _execute_formatted(conn, "GRANT USAGE ON SCHEMA public TO %I", role)
    for table, privileges in TABLE_GRANTS[component].items():
        await _execute_formatted(conn, f"GRANT {', '.join(privileges)} ON TABLE public.%I TO %I", table, role)
    for table, column in SEQUENCE_GRANTS[component]:
        sequence = await conn.fetchval("SELECT pg_get_serial_sequence($1, $2)", f"public.{table}", column)
        # pg_get_serial_sequence's answer is already quoted where needed: %s, not %I.
        await _execute_formatted(conn, "GRANT USAGE ON SEQUENCE %s TO %I", sequence, role)


async def _execute_formatted(conn: asyncpg.Connection, template: str, *args: str) -> None:
    """Run a utility statement (which takes no $n parameters) built by the server's ``format()``."""
    placeholders = ", ".join(f"${index}::text" for index in range(2, len(args) + 2))
    statement: str = await conn.fetchval(f"SELECT format($1, {placeholders})", template, *args)
    await conn.execute(statement)


# ---- passwords ----------------------------------------------------------------------------------------


SCRAM_ITERATIONS: Final = 4096  # PostgreSQL's default (scram_iterations)


def scram_sha256_verifier(password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``, as PostgreSQL stores it (RFC 7677).

    ASCII passwords only (checked by the settings): PostgreSQL passes them through SASLprep unchanged, so
    this verifier is the one the server would compute.
    """
    if not password.isascii():
        raise ValueError("the password must be ASCII")
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored_key).decode()}:{b64(server_key).decode()}"


def scram_verifier_matches(verifier: str, password: str) -> bool:
    """Would a server holding ``verifier`` accept ``password``? (The server's own check, RFC 5802.)"""
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", verifier)
    if match is None:
        return False
    expected = scram_sha256_verifier(password, salt=base64.b64decode(match[2]), iterations=int(match[1]))
    return hmac.compare_digest(expected, verifier)
