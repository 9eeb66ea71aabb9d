"""Least privilege: each process's PostgreSQL role and RabbitMQ user can do its job and nothing more.

Against the real PostgreSQL and RabbitMQ, with two databases and one vhost of this module's own. Roles are
cluster-wide, so every role made here carries a prefix unique to the run (``crm_t<run>_worker`` ...) and is
dropped at the end, after the databases holding its grants; the broker users likewise (``crm_t<run>_gateway``).

What a role may do is checked by running the real code paths as that role (``apply_batch``, ``record_failure``,
the retention cleanup, the gateway's ``ReadStore``, the replay tool's audit and newest-stamp read), and what it
may not by trying it: each refusal must be PostgreSQL's or RabbitMQ's own (insufficient_privilege,
ACCESS_REFUSED). Passwords: the stored SCRAM verifier is checked against the password the way the server
checks it, and — where this machine can run a private PostgreSQL with password authentication — by logging in.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import pytest
from aiormq.exceptions import ChannelAccessRefused

from bench.stack import free_port, rabbitmqctl, with_database, with_vhost
from deploy.rabbitmq.permissions import amqp_permissions, rabbitmq_password_matches
from gateway.request_ids import new_request_id
from gateway.store import ReadStore
from shared.cli import StartupError
from shared.clock.stamps import HybridClock
from shared.envelope import RequestEnvelope
from shared.migrate import apply_migrations, migrate
from shared.roles import (
    COMPONENTS,
    TABLE_GRANTS,
    create_roles,
    role_name,
    scram_sha256_verifier,
    scram_verifier_matches,
)
from shared.settings import Settings
from shared.topology import Topology
from tests.support import (
    ADMIN_AMQP_URL,
    ADMIN_DATABASE_URL,
    ROOT,
    RUN_ID,
    Gateway,
    Stack,
    have_rabbitmqctl,
    unique_phone,
)
from tests.test_entry_points import assert_one_line_failure, run
from worker import dead_letters
from worker.replay import fresh_stamp_clock
from worker.repository import (
    LetterFilter,
    Request,
    apply_batch,
    delete_expired_processed,
    init_connection,
    record_audit,
    record_failure,
    select_audit,
    select_customer_states,
    select_request_statuses,
)

PREFIX = f"crm_t{RUN_ID}_"  # the roles of most tests
PASSWORDS = {"worker": f"wk-{RUN_ID}-pw", "gateway": f"gw-{RUN_ID}-pw", "replay": f"rp-{RUN_ID}-pw"}
DATABASES = (f"crm_roles_{RUN_ID}_a", f"crm_roles_{RUN_ID}_b")
VHOST = f"crm_roles_{RUN_ID}"
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
WINDOW = dt.timedelta(hours=24)


def with_user(url: str, user: str, password: str | None = None) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    auth = urllib.parse.quote(user, safe="") + (f":{urllib.parse.quote(password, safe='')}" if password else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{auth}@{host}"))


def url_of(component: str, database: str = DATABASES[0], prefix: str = PREFIX) -> str:
    """The database URL a process of ``component`` uses: its own role, with its password."""
    return with_user(with_database(ADMIN_DATABASE_URL, database), role_name(component, prefix),
                     PASSWORDS[component])


async def connect_as(component: str, database: str = DATABASES[0]) -> asyncpg.Connection:
    conn = await asyncpg.connect(url_of(component, database))
    await init_connection(conn)
    return conn


async def admin(database: str = DATABASES[0]) -> asyncpg.Connection:
    return await asyncpg.connect(with_database(ADMIN_DATABASE_URL, database))


async def existing_roles(like: str) -> set[str]:
    conn = await asyncpg.connect(ADMIN_DATABASE_URL)
    try:
        return {row["rolname"] for row in await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE $1",
                                                           like.replace("_", r"\_") + "%")}
    finally:
        await conn.close()


async def drop_roles(roles: set[str]) -> None:
    conn = await asyncpg.connect(ADMIN_DATABASE_URL)
    try:
        for role in roles:
            await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
    finally:
        await conn.close()


def envelope(user: str, **payload: Any) -> RequestEnvelope:
    return RequestEnvelope(request_id=new_request_id(int(time.time() * 1000)), stamp=HybridClock().now(),
                           user_id=user, payload={"userId": user, **payload},
                           idempotency_key=f"key-{uuid.uuid4().hex}", body_hash="h")


def request(env: RequestEnvelope) -> Request:
    return Request(env, env.customer())


# ---- fixtures: two databases, the roles, cleanup of exactly what this module made ---------------------------


@pytest.fixture(scope="module")
async def databases() -> AsyncIterator[tuple[str, str]]:
    """Two migrated databases of this module's own; then every ``crm_*<run>`` role made here is dropped."""
    before = await existing_roles("crm_")
    conn = await asyncpg.connect(ADMIN_DATABASE_URL)
    try:
        for name in DATABASES:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        for name in DATABASES:
            await migrate(with_database(ADMIN_DATABASE_URL, name))
        yield DATABASES
    finally:
        conn = await asyncpg.connect(ADMIN_DATABASE_URL)
        try:
            for name in DATABASES:  # first: a role cannot be dropped while a database holds grants to it
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        ours = {role for role in await existing_roles("crm_") - before if RUN_ID in role}
        await drop_roles(ours)


@pytest.fixture(scope="module")
async def roles(databases: tuple[str, str]) -> list[str]:
    conn = await admin()
    try:
        results = await create_roles(conn, PASSWORDS, PREFIX)
    finally:
        await conn.close()
    return [result.role for result in results]


async def assert_refused(conn: asyncpg.Connection, statement: str, *args: Any) -> None:
    """PostgreSQL itself refuses ``statement`` for lack of privilege (and nothing was done)."""
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute(statement, *args)


# ---- the roles themselves -------------------------------------------------------------------------------


async def test_create_roles_makes_login_roles_without_any_administrative_attribute(roles: list[str]) -> None:
    conn = await admin()
    try:
        rows = await conn.fetch(
            "SELECT rolname, rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls,"
            " (SELECT count(*) FROM pg_auth_members WHERE member = r.oid) AS memberships"
            " FROM pg_roles AS r WHERE rolname = ANY($1::text[]) ORDER BY rolname", roles)
    finally:
        await conn.close()
    assert sorted(roles) == sorted(role_name(component, PREFIX) for component in COMPONENTS)
    assert [row["rolname"] for row in rows] == sorted(roles)
    for row in rows:
        assert row["rolcanlogin"], row
        assert not any(row[column] for column in ("rolsuper", "rolcreatedb", "rolcreaterole", "rolreplication",
                                                  "rolbypassrls")), row
        assert row["memberships"] == 0, row


async def test_passwords_from_settings_are_stored_as_scram_verifiers(roles: list[str]) -> None:
    conn = await admin()
    try:
        stored = dict(await conn.fetch("SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY($1::text[])",
                                       roles))
    finally:
        await conn.close()
    for component in COMPONENTS:
        verifier = stored[role_name(component, PREFIX)]
        assert verifier.startswith("SCRAM-SHA-256$4096:"), verifier
        assert scram_verifier_matches(verifier, PASSWORDS[component])  # the server's own check
        assert not scram_verifier_matches(verifier, PASSWORDS[component] + "x")
        assert PASSWORDS[component] not in verifier


async def test_a_run_without_passwords_keeps_them_and_a_new_one_replaces_it(roles: list[str]) -> None:
    conn = await admin()
    try:
        await create_roles(conn, {}, PREFIX)
        role = role_name("gateway", PREFIX)
        kept = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", role)
        await create_roles(conn, {"gateway": "rotated-pw"}, PREFIX)
        rotated = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", role)
        await create_roles(conn, PASSWORDS, PREFIX)  # back, for the tests after this one
    finally:
        await conn.close()
    assert scram_verifier_matches(kept, PASSWORDS["gateway"])
    assert scram_verifier_matches(rotated, "rotated-pw")


async def test_scram_verifier_is_the_one_postgresql_computes_for_the_same_salt(databases: tuple[str, str]) -> None:
    role, password = f"crm_v{RUN_ID}_probe", "pencil !#$%&'()*+,-./:;<=>?@[]^_`{|}~"
    owner = await admin()
    try:
        # Here only, the server hashes a plaintext password itself (the code under test never sends one).
        await owner.execute(await owner.fetchval("SELECT format('CREATE ROLE %I PASSWORD %L', $1::text, $2::text)",
                                                 role, password))
        theirs = await owner.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", role)
    finally:
        await owner.execute(f'DROP ROLE IF EXISTS "{role}"')
        await owner.close()
    salt = base64.b64decode(theirs.split("$")[1].split(":")[1])
    assert scram_sha256_verifier(password, salt=salt) == theirs


# ---- worker ---------------------------------------------------------------------------------------------


async def test_worker_role_applies_batches_records_failures_and_cleans_up(roles: list[str]) -> None:
    user = f"roles_{RUN_ID}_w"
    conn = await connect_as("worker")
    try:
        created = await apply_batch(conn, [request(envelope(user, phone=unique_phone(), name="张三"))], WINDOW)
        updated = await apply_batch(conn, [request(envelope(user, nickname="小张"))], WINDOW)
        await record_failure(conn, new_request_id(int(time.time() * 1000)), user, "boom")
        await record_failure(conn, new_request_id(int(time.time() * 1000)), user, "boom again")
        assert await delete_expired_processed(conn, dt.timedelta(hours=48)) == 0
        assert await apply_migrations(conn) == []  # MIGRATE_ON_START with this role: nothing to do, no DDL
    finally:
        await conn.close()
    assert [outcome.status for outcome in created + updated] == ["created", "updated"]
    assert created[0].id == updated[0].id is not None


async def test_worker_role_cannot_drop_create_truncate_or_delete_customers(roles: list[str]) -> None:
    conn = await connect_as("worker")
    try:
        await assert_refused(conn, "DROP TABLE customers")
        await assert_refused(conn, "CREATE TABLE worker_was_here (x int)")
        await assert_refused(conn, "ALTER TABLE customers ADD COLUMN x int")
        await assert_refused(conn, "TRUNCATE processed_requests")
        await assert_refused(conn, "DELETE FROM customers")
        await assert_refused(conn, "INSERT INTO schema_migrations (version) VALUES ('9999_evil')")
    finally:
        await conn.close()


async def test_worker_role_cannot_read_or_write_the_dead_letter_audit(roles: list[str]) -> None:
    conn = await connect_as("worker")
    try:
        await assert_refused(conn, "SELECT * FROM dead_letter_audit")
        await assert_refused(conn, "INSERT INTO dead_letter_audit (actor, action, outcome) VALUES ('w', 'x', 'y')")
    finally:
        await conn.close()


async def test_worker_role_with_a_pending_migration_says_to_run_migrate_as_the_owner(roles: list[str]) -> None:
    owner = await admin()
    last = await owner.fetchval("SELECT max(version) FROM schema_migrations")
    await owner.execute("DELETE FROM schema_migrations WHERE version = $1", last)
    conn = await connect_as("worker")
    try:
        pending = rf"migration {last} is pending but role {PREFIX}worker may not"
        with pytest.raises(StartupError, match=pending) as error:
            await apply_migrations(conn)
    finally:
        await conn.close()
        await owner.execute("INSERT INTO schema_migrations (version) VALUES ($1)", last)
        await owner.close()
    assert "python -m shared.migrate" in str(error.value)


# ---- gateway --------------------------------------------------------------------------------------------


async def test_gateway_role_runs_the_read_stores_queries(roles: list[str]) -> None:
    user = f"roles_{RUN_ID}_g"
    applied = envelope(user, name="李四")
    conn = await connect_as("worker")
    try:
        await apply_batch(conn, [request(applied)], WINDOW)
        failed_id = new_request_id(int(time.time() * 1000))
        await record_failure(conn, failed_id, user, "bad")
    finally:
        await conn.close()
    store = ReadStore(url_of("gateway"), pool_size=1, retention_hours=48)
    await store.start()
    try:
        customer = await store.customer(user)
        now_ms = int(time.time() * 1000)
        status = await store.request_status(applied.request_id, now_ms)
        failure = await store.request_status(failed_id, now_ms)
    finally:
        await store.stop()
    assert customer is not None and customer["name"] == "李四"
    assert status is not None and status.status == "created"
    assert failure is not None and failure.status == "failed"


@pytest.mark.parametrize("table", sorted({table for grants in TABLE_GRANTS.values() for table in grants}
                                         | {"dead_letter_audit"}))
async def test_gateway_role_cannot_insert_update_or_delete(roles: list[str], table: str) -> None:
    # A plain connection, not the store's read-only pool: the refusal must come from the grants.
    conn = await connect_as("gateway")
    try:
        column = await conn.fetchval(  # pg_attribute: information_schema hides what the role may not read
            "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 ORDER BY attnum LIMIT 1",
            table)
        await assert_refused(conn, f"INSERT INTO {table} DEFAULT VALUES")
        await assert_refused(conn, f"UPDATE {table} SET {column} = {column}")
        await assert_refused(conn, f"DELETE FROM {table}")
    finally:
        await conn.close()


# ---- replay ---------------------------------------------------------------------------------------------


async def test_replay_role_writes_the_audit_and_reads_the_newest_stamp(roles: list[str]) -> None:
    settings = Settings(database_url=url_of("replay"))
    request_id = new_request_id(int(time.time() * 1000))
    conn = await connect_as("worker")
    try:
        await record_failure(conn, request_id, "someone", "dead")
    finally:
        await conn.close()

    conn = await connect_as("replay")
    try:
        await record_audit(conn, "test", "replay", {"all": True}, [request_id], "replayed 1")
        clock = await fresh_stamp_clock(settings, conn)
    finally:
        await conn.close()

    owner = await admin()
    try:
        audited = await owner.fetchval("SELECT count(*) FROM dead_letter_audit WHERE $1 = ANY(request_ids)",
                                       request_id)
        still_failed = await owner.fetchval("SELECT count(*) FROM failed_requests WHERE request_id = $1", request_id)
        newest = await owner.fetchval("SELECT max(value::bigint) FROM customers, jsonb_each_text(field_stamps)")
    finally:
        await owner.close()
    assert (audited, still_failed) == (1, 0)
    assert clock.now() > newest


async def test_replay_role_can_do_nothing_more(roles: list[str]) -> None:
    conn = await connect_as("replay")
    try:
        # The audit trail is append-only, for the tool and the console alike.
        await assert_refused(conn, "UPDATE dead_letter_audit SET actor = 'someone else'")
        await assert_refused(conn, "DELETE FROM dead_letter_audit")
        await assert_refused(conn, "UPDATE processed_requests SET outcome = 'created'")
        await assert_refused(conn, "UPDATE customers SET name = 'x'")
        await assert_refused(conn, "INSERT INTO customers (user_id) VALUES ('replay-was-here')")
        await assert_refused(conn, "DELETE FROM processed_requests")
        await assert_refused(conn, "INSERT INTO failed_requests (request_id, error) VALUES ('r', 'e')")
        await assert_refused(conn, "DROP TABLE dead_letter_audit")
    finally:
        await conn.close()


async def test_replay_role_runs_the_consoles_reads_dry_run_and_audit_page(roles: list[str]) -> None:
    """The console uses the replay role: dead letters searched, the dry run's customers and request statuses read,
    audit rows written (their id returned) and read back."""
    user = f"console_{RUN_ID}"
    conn = await connect_as("worker")
    try:
        [outcome] = await apply_batch(conn, [request(envelope(user, name="王五"))], WINDOW)
    finally:
        await conn.close()

    conn = await connect_as("replay")
    try:
        letters = await dead_letters.stored(conn, Topology(prefix="crm", shard_count=2, queue_type="quorum"),
                                            LetterFilter(user_id=user, q="王五"), newest_first=True, limit=50)
        states = await select_customer_states(conn, [user])
        statuses = await select_request_statuses(conn, [outcome.request_id, "never-seen"])
        audit_id = await record_audit(conn, "console-test", "reveal", {"id": 1}, [outcome.request_id], "revealed")
        [audit] = await select_audit(conn, audit_id=audit_id)
    finally:
        await conn.close()

    assert letters == []
    assert states[user].values["name"] == "王五" and states[user].stamps["name"] > 0
    assert (statuses[outcome.request_id].status, statuses["never-seen"].status) == ("created", "pending")
    assert (audit["actor"], audit["action"], audit["request_ids"]) == ("console-test", "reveal", [outcome.request_id])


# ---- re-runs, several databases, concurrency, drift -----------------------------------------------------


async def test_create_roles_runs_twice_and_for_a_second_database(roles: list[str]) -> None:
    for database in DATABASES:
        conn = await admin(database)
        try:
            again = await create_roles(conn, PASSWORDS, PREFIX)
        finally:
            await conn.close()
        assert [result.created for result in again] == [False, False, False]
    reader = await connect_as("gateway", DATABASES[1])  # grants are per database: the second has its own
    try:
        assert await reader.fetchval("SELECT count(*) FROM customers") == 0
        await assert_refused(reader, "DELETE FROM customers")
    finally:
        await reader.close()


async def test_concurrent_runs_on_two_databases_create_each_role_once(databases: tuple[str, str]) -> None:
    prefix = f"crm_c{RUN_ID}_"

    async def one_run(database: str) -> list[bool]:
        conn = await admin(database)
        try:
            return [result.created for result in await create_roles(conn, PASSWORDS, prefix)]
        finally:
            await conn.close()

    runs = await asyncio.gather(*(one_run(database) for database in DATABASES * 3))

    assert [sum(created) for created in zip(*runs, strict=True)] == [1, 1, 1]  # each role created by one run
    assert await existing_roles(prefix) == {role_name(component, prefix) for component in COMPONENTS}


async def test_a_rerun_takes_back_privileges_granted_by_hand(roles: list[str]) -> None:
    owner = await admin()
    try:
        await owner.execute(f'GRANT DELETE, TRUNCATE ON customers TO "{PREFIX}gateway"')
        await owner.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")  # what databases made before PG 15 allow
        await create_roles(owner, PASSWORDS, PREFIX)
    finally:
        await owner.close()
    gateway, worker = await connect_as("gateway"), await connect_as("worker")
    try:
        await assert_refused(gateway, "DELETE FROM customers WHERE false")
        await assert_refused(worker, "CREATE TABLE worker_was_here (x int)")
    finally:
        await gateway.close()
        await worker.close()


async def test_an_existing_role_with_more_attributes_is_brought_back_to_least_privilege(
    databases: tuple[str, str],
) -> None:
    prefix = f"crm_x{RUN_ID}_"
    owner = await admin()
    try:
        await owner.execute(f'CREATE ROLE "{prefix}worker" LOGIN CREATEDB CREATEROLE')
        results = await create_roles(owner, {}, prefix)
        row = await owner.fetchrow("SELECT rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = $1",
                                   f"{prefix}worker")
    finally:
        await owner.close()
    assert not results[0].created
    assert (row["rolcreatedb"], row["rolcreaterole"]) == (False, False)


async def test_grants_are_per_table_so_a_new_column_needs_no_new_grant(roles: list[str]) -> None:
    owner = await admin()
    try:
        await owner.execute("ALTER TABLE processed_requests ADD COLUMN later_column text")
    finally:
        await owner.close()
    worker, gateway = await connect_as("worker"), await connect_as("gateway")
    try:
        await worker.execute("UPDATE processed_requests SET later_column = 'x' WHERE false")
        assert await gateway.fetchval("SELECT count(later_column) FROM processed_requests") == 0
    finally:
        await worker.close()
        await gateway.close()


# ---- the command line -----------------------------------------------------------------------------------


async def test_cli_create_roles_twice_and_for_two_databases_logs_no_password(databases: tuple[str, str]) -> None:
    prefix = f"crm_k{RUN_ID}_"
    env = {"PATH": os.environ.get("PATH", ""), "DB_ROLE_PREFIX": prefix, "LOG_LEVEL": "DEBUG",
           **{f"CRM_{component.upper()}_PASSWORD": password for component, password in PASSWORDS.items()}}

    def for_database(database: str) -> dict[str, str]:
        return {**env, "DATABASE_URL": with_database(ADMIN_DATABASE_URL, database)}

    first, second = await asyncio.gather(*(run("shared.migrate", "--create-roles", env=for_database(database))
                                           for database in DATABASES))
    again = await run("shared.migrate", "--create-roles", env=for_database(DATABASES[0]))

    for result in (first, second, again):
        assert result.code == 0, result
        assert f"roles granted on this database: {prefix}worker" in result.stdout, result
        for password in PASSWORDS.values():
            assert password not in result.stdout + result.stderr
        assert "SCRAM-SHA-256$" not in result.stdout + result.stderr
    assert "(created, password set)" in first.stdout + second.stdout
    assert "(existed, password set)" in again.stdout


# ---- a real password login (a private PostgreSQL with scram-sha-256 authentication) ---------------------


@pytest.fixture(scope="module")
def password_only_postgres() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on a free port that accepts passwords only; its superuser URL."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or (
        [Path(tool)] if (tool := shutil.which("initdb")) else [])
    if not found:
        pytest.skip("no initdb here")
    bin_dir = found[-1].parent
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        if shutil.which("runuser") is None:
            pytest.skip("root without runuser: cannot run initdb")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="crm_pw_pg_"))
    data, superuser_password, port = folder / "data", f"su-{RUN_ID}", free_port()
    (folder / "pw").write_text(superuser_password)
    if as_postgres:
        shutil.chown(folder, "postgres")
        shutil.chown(folder / "pw", "postgres")
    try:
        subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A",
                        "scram-sha-256", f"--pwfile={folder / 'pw'}"], check=True, capture_output=True, timeout=120)
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(folder / "log"),
                        "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"cannot start a private PostgreSQL: {exc}")
    try:
        yield f"postgresql://postgres:{superuser_password}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


async def test_passwords_set_from_the_environment_allow_login_and_others_do_not(password_only_postgres: str) -> None:
    conn = await asyncpg.connect(password_only_postgres)
    try:
        await apply_migrations(conn)
        await create_roles(conn, PASSWORDS, PREFIX)
    finally:
        await conn.close()

    for component in COMPONENTS:
        url = with_user(password_only_postgres, role_name(component, PREFIX), PASSWORDS[component])
        role = await asyncpg.connect(url)
        try:
            assert await role.fetchval("SELECT current_user") == role_name(component, PREFIX)
        finally:
            await role.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(with_user(password_only_postgres, role_name(component, PREFIX), "wrong"))


# ---- RabbitMQ: a user per component, from deploy/rabbitmq/definitions.json -----------------------------------


def test_definitions_file_gives_each_component_the_documented_permissions() -> None:
    definitions = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    expected = amqp_permissions("crm")
    granted = {entry["user"]: entry for entry in definitions["permissions"]}
    for component in COMPONENTS:
        entry = granted[f"crm_{component}"]
        assert (entry["configure"], entry["write"], entry["read"]) == (
            expected[component].configure, expected[component].write, expected[component].read), component
        user = next(user for user in definitions["users"] if user["name"] == f"crm_{component}")
        assert user["tags"] == [] and user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert rabbitmq_password_matches(user["password_hash"], f"crm_{component}_dev")


@pytest.fixture(scope="module")
def broker_users() -> Iterator[dict[str, str]]:
    """definitions.json imported into a vhost of this module's own, users renamed ``crm_t<run>_<component>``:
    {component: AMQP URL with its development password}."""
    if not have_rabbitmqctl():
        pytest.skip("no rabbitmqctl: cannot make users")
    definitions = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    rename = {f"crm_{component}": f"crm_t{RUN_ID}_{component}" for component in COMPONENTS}
    definitions["users"] = [dict(user, name=rename[user["name"]]) for user in definitions["users"]
                            if user["name"] in rename]
    definitions["permissions"] = [dict(entry, user=rename[entry["user"]], vhost=VHOST)
                                  for entry in definitions["permissions"] if entry["user"] in rename]
    definitions["vhosts"] = [{"name": VHOST}]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(definitions, file)
    os.chmod(file.name, 0o644)  # the broker node (another user) reads the file, not rabbitmqctl
    try:
        rabbitmqctl("import_definitions", file.name)
        deadline = time.monotonic() + 30  # the import runs asynchronously on the node
        while not all(user in rabbitmqctl("list_permissions", "-p", VHOST).stdout for user in rename.values()):
            assert time.monotonic() < deadline, "definitions not imported within 30 s"
            time.sleep(0.2)
        rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
        yield {component: with_user(with_vhost(ADMIN_AMQP_URL, VHOST), rename[f"crm_{component}"],
                                    f"crm_{component}_dev") for component in COMPONENTS}
    finally:
        os.unlink(file.name)
        for args in [("delete_vhost", VHOST), *(("delete_user", user) for user in rename.values())]:
            with contextlib.suppress(subprocess.CalledProcessError):
                rabbitmqctl(*args)


@pytest.fixture(scope="module")
def least_privilege_stack(
    roles: list[str], broker_users: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A worker and a gateway, each with its own role and broker user only (prefix crm, as in compose)."""
    stack = Stack(with_database(ADMIN_DATABASE_URL, DATABASES[0]), with_vhost(ADMIN_AMQP_URL, VHOST),
                  prefix="crm", log_dir=tmp_path_factory.mktemp("roles"))
    try:
        # MIGRATE_ON_START stays at its default (true): the restricted worker must start all the same.
        stack.start_worker(DATABASE_URL=url_of("worker"), AMQP_URL=broker_users["worker"])
        stack.start_gateway(DATABASE_URL=url_of("gateway"), AMQP_URL=broker_users["gateway"])
        yield stack
    finally:
        stack.stop()


async def test_stack_on_least_privilege_roles_and_users_creates_updates_reads_and_reports_status(
    least_privilege_stack: Stack,
) -> None:
    gateway_url = next(proc for proc in least_privilege_stack.procs if isinstance(proc, Gateway)).url
    user = f"roles_{RUN_ID}_live"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.post(f"{gateway_url}/api/external/customers",
                             json={"userId": user, "phone": unique_phone(), "name": "王五"}) as response:
            created, created_body = response.status, await response.json()
            request_id = response.headers["X-Request-Id"]
        async with http.post(f"{gateway_url}/api/external/customers",
                             json={"userId": user, "nickname": "小王"}) as response:
            updated, updated_body = response.status, await response.json()
        async with http.get(f"{gateway_url}/api/external/customers/{user}") as response:
            read, read_body = response.status, await response.json()
        async with http.get(f"{gateway_url}/api/external/requests/{request_id}") as response:
            status, status_body = response.status, await response.json()

    assert (created, created_body["data"]["action"]) == (201, "created"), created_body
    assert (updated, updated_body["data"]["action"]) == (200, "updated"), updated_body
    assert read == 200 and read_body["data"]["name"] == "王五" and read_body["data"]["nickname"] == "小王", read_body
    assert status == 200 and status_body["data"]["status"] == "created", status_body
    logs = "".join(proc.output() for proc in least_privilege_stack.procs)
    for password in (*PASSWORDS.values(), "crm_worker_dev", "crm_gateway_dev"):
        assert password not in logs  # URL passwords never reach a log line


async def test_replay_tool_lists_dead_letters_with_its_own_role_and_user(
    least_privilege_stack: Stack, broker_users: dict[str, str],
) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "DATABASE_URL": url_of("replay"), "AMQP_URL": broker_users["replay"],
           "AMQP_PREFIX": "crm", "SHARD_COUNT": "8"}

    listed = await run("worker.replay", "list", env=env)
    replayed = await run("worker.replay", "replay", "--all", "--actor", "test", env=env)

    assert listed.code == 0 and "0 dead letter(s)" in listed.stdout, listed
    assert replayed.code == 0, replayed


async def broker_attempt(url: str, action: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        if action == "get the dead letters":
            queue = await channel.declare_queue("crm.dead", passive=True)
            await queue.get(fail=False)
        elif action == "publish a request":
            exchange = await channel.get_exchange("crm.requests", ensure=False)
            # Routed nowhere: the administrator's attempt below must not feed the running worker.
            await exchange.publish(aio_pika.Message(b"{}"), routing_key=f"nowhere.{RUN_ID}")
        elif action == "declare a reply queue":
            await channel.declare_queue(f"crm.reply.{RUN_ID}", exclusive=True, auto_delete=True)
        elif action == "declare another prefix's queue":
            await channel.declare_queue(f"other{RUN_ID}.shard.0", durable=True)
        elif action == "bind a shard queue":
            queue = await channel.declare_queue("crm.shard.0", passive=True)
            await queue.bind("crm.requests", routing_key=f"stolen.{RUN_ID}")
        else:
            raise AssertionError(action)
    finally:
        await connection.close()


@pytest.mark.parametrize(("component", "action"), [
    ("gateway", "get the dead letters"),
    ("gateway", "declare another prefix's queue"),
    ("worker", "get the dead letters"),
    ("worker", "publish a request"),
    ("worker", "declare a reply queue"),
    ("replay", "declare a reply queue"),
    ("replay", "bind a shard queue"),
])
async def test_broker_user_is_refused_what_its_component_never_does(
    least_privilege_stack: Stack, broker_users: dict[str, str], component: str, action: str,
) -> None:
    with pytest.raises(ChannelAccessRefused, match="ACCESS_REFUSED"):
        await broker_attempt(broker_users[component], action)
    # ...while the administrator may: the refusal is the permission, not a missing queue or exchange.
    if action not in ("declare another prefix's queue", "bind a shard queue"):
        await broker_attempt(with_vhost(ADMIN_AMQP_URL, VHOST), action)


# ---- secrets in start-up errors ---------------------------------------------------------------------------


async def test_startup_error_with_a_wrong_password_prints_no_password(
    broker_users: dict[str, str], databases: tuple[str, str],
) -> None:
    secret = f"Wr0ng-{RUN_ID}"
    env = {"PATH": os.environ.get("PATH", ""), "AMQP_PREFIX": f"pw{RUN_ID}",
           "DATABASE_URL": with_database(ADMIN_DATABASE_URL, DATABASES[0])}
    wrong_amqp = with_user(with_vhost(ADMIN_AMQP_URL, VHOST), f"crm_t{RUN_ID}_gateway", secret)
    # pg_hba here trusts 127.0.0.1, so a wrong password alone is accepted: an unknown role is what fails.
    wrong_database = with_user(with_database(ADMIN_DATABASE_URL, DATABASES[0]), f"crm_nobody{RUN_ID}", secret)

    gateway = await run("gateway", env={**env, "AMQP_URL": wrong_amqp, "PORT": str(free_port())})
    worker = await run("worker", env={**env, "AMQP_URL": wrong_amqp, "DATABASE_URL": wrong_database})
    migrate_run = await run("shared.migrate", "--create-roles", env={**env, "DATABASE_URL": wrong_database})

    assert_one_line_failure(gateway, "authentication failed")
    assert_one_line_failure(worker, f"crm_nobody{RUN_ID}:***@")
    assert_one_line_failure(migrate_run, f"crm_nobody{RUN_ID}:***@")
    for result in (gateway, worker, migrate_run):
        assert secret not in result.stdout + result.stderr, result
