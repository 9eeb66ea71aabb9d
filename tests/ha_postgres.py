"""HA test support: a real PostgreSQL primary with a synchronous streaming standby, built beside the machine's own.

``PostgresPair`` runs ``initdb`` for a primary, ``pg_basebackup -R`` for a standby named ``standby1`` that the
primary waits for on every commit (``synchronous_standby_names``), both as user ``postgres`` in one temporary
directory, on free ports, listening on 127.0.0.1 only, trust authentication. The machine's cluster (5432) is
never touched. The standby's wall clock may be shifted with libfaketime (``clock_offset_seconds``) to make
the two servers' clocks disagree.

Tests kill the primary (kill -9) and promote the standby; the libpq multi-host URL (``url()``) with
``target_session_attrs=read-write`` then finds the promoted standby. The standby has no synchronous standby of
its own, so once promoted it accepts writes on its own.

Everything is removed on the way out, also after a build that failed half-way: both servers are stopped
(``pg_ctl stop -m immediate``), whatever is left of their processes is killed, the directory is deleted.
Where PostgreSQL's binaries are missing, or we are neither root nor ``postgres``, entering the pair skips the
test, saying why. The methods block: from async code call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.stack import free_port
from tests.ha_rabbit import as_user, kill_session, pid_alive
from tests.native_fixture import NativeFixture

PG_USER = "postgres"
PG_VERSION = "15"
PG_BIN = Path(f"/usr/lib/postgresql/{PG_VERSION}/bin")
STANDBY_NAME = "standby1"
# libfaketime preloaded into the server itself (as tests/test_causal_order.py does for gateways): the `faketime`
# wrapper would fork, and pg_ctl would then stop the wrapper, not the server.
LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))), None)

PRIMARY_SETTINGS = """
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = '256MB'
hot_standby = on
synchronous_commit = on
synchronous_standby_names = '{standby}'
wal_receiver_status_interval = '1s'
max_connections = 100
shared_buffers = '32MB'
fsync = off
dynamic_shared_memory_type = mmap
log_line_prefix = '%m [%p] '
"""
# fsync off: the tests kill processes, never the machine, so nothing written is lost and initdb, base backup
# and commits go faster. Dynamic shared memory in files of the data directory, not /dev/shm: a killed server
# leaves nothing behind once the directory is gone.


def postgres_unavailable(clock_offset_seconds: float = 0) -> str | None:
    """Why no pair can be built here (``None`` when one can)."""
    missing = [name for name in ("initdb", "pg_ctl", "pg_basebackup", "postgres", "psql")
               if not (PG_BIN / name).exists()]
    if missing:
        return f"PostgreSQL {PG_VERSION} binaries missing in {PG_BIN}: {', '.join(missing)}"
    try:
        user = pwd.getpwnam(PG_USER)
    except KeyError:
        return f"no user {PG_USER}"
    if os.getuid() not in (0, user.pw_uid):
        return f"needs root or {PG_USER} to run PostgreSQL servers as {PG_USER}"
    if os.getuid() == 0 and shutil.which("setpriv") is None:
        return "setpriv (util-linux) not installed"
    if clock_offset_seconds and LIBFAKETIME is None:
        return "libfaketime (Debian package faketime) not installed"
    return None


class PgServer:
    """One server of the pair: its data directory, port and log."""

    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.port = free_port()
        self.data = base / name
        self.log_path = base / f"{name}.log"
        self.socket_dir = base / "run"
        self.env: dict[str, str] = {}
        self.pid: int | None = None
        self.shm_id: int | None = None

    def pg_ctl(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args], cwd=self.data.parent,
                               env=self.env, timeout=timeout, check=check)

    def start(self) -> None:
        self.pg_ctl("-l", str(self.log_path), "-w", "-t", "90", "start")
        # The postmaster and its System V segment (line 7 of postmaster.pid: key, id), to remove it after a kill.
        lines = (self.data / "postmaster.pid").read_text().splitlines()
        self.pid = int(lines[0])
        with contextlib.suppress(IndexError, ValueError):
            self.shm_id = int(lines[6].split()[1])

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid from ``postmaster.pid`` (``None`` when it is not running)."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            if pid_alive(pid):
                return pid
        return None

    def kill(self) -> None:
        """kill -9 of the postmaster and of every process of its session (pg_ctl starts it with setsid)."""
        pid = self.postmaster_pid()
        if pid is not None:
            kill_session(pid, pid)

    def stop(self) -> None:
        """pg_ctl stop -m immediate, then kill -9 of whatever is left."""
        if self.postmaster_pid() is not None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.pg_ctl("stop", "-m", "immediate", "-w", "-t", "20", check=False, timeout=30)
        self.kill()
        self.remove_shared_memory()

    def remove_shared_memory(self) -> None:
        """Remove the postmaster's System V segment if a kill -9 left it (created by it, attached to nobody)."""
        if self.shm_id is None or self.pid is None:
            return
        with contextlib.suppress(OSError):
            for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
                fields = line.split()
                shm_id, creator, attached = int(fields[1]), int(fields[4]), int(fields[6])
                if shm_id == self.shm_id and creator == self.pid and attached == 0:
                    subprocess.run(["ipcrm", "-m", str(shm_id)], capture_output=True, timeout=10, check=False)
        self.shm_id = None

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def run_as_postgres(command: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120,
                    check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as user postgres; ``env`` applies behind ``setpriv`` only (a preload stays out of it)."""
    base_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": pwd.getpwnam(PG_USER).pw_dir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }
    extra = ["env", *(f"{key}={value}" for key, value in env.items())] if env else []
    result = subprocess.run([*as_user(PG_USER), *extra, *command], cwd=cwd, env=base_env, capture_output=True,
                            text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


class PostgresPair(NativeFixture):
    """A PostgreSQL primary and its synchronous standby on this machine; a sync or async context manager.

    ``clock_offset_seconds``: the standby's wall clock is shifted by that much (libfaketime; monotonic clock
    untouched), e.g. -30 puts it 30 s behind the primary's.
    """

    def __init__(self, *, clock_offset_seconds: float = 0) -> None:
        self.clock_offset_seconds = clock_offset_seconds
        self.base: Path | None = None
        self.primary: PgServer | None = None
        self.standby: PgServer | None = None
        self.build_seconds: float | None = None

    # --- life cycle -------------------------------------------------------------------------------------------

    def unavailable(self) -> str | None:
        return postgres_unavailable(self.clock_offset_seconds)

    def build(self) -> None:
        """initdb and start the primary, base-backup and start the standby, wait until it is synchronous."""
        started = time.monotonic()
        self.base = Path(tempfile.mkdtemp(prefix="crmha-pg-"))
        user = pwd.getpwnam(PG_USER)
        self.base.chmod(0o755)
        os.chown(self.base, user.pw_uid, user.pw_gid)
        primary = self.primary = PgServer("primary", self.base)
        standby = self.standby = PgServer("standby", self.base)
        primary.socket_dir.mkdir()
        os.chown(primary.socket_dir, user.pw_uid, user.pw_gid)

        run_as_postgres([str(PG_BIN / "initdb"), "-D", str(primary.data), "-U", PG_USER, "--auth=trust",
                         "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"], cwd=self.base)
        with open(primary.data / "postgresql.conf", "a") as conf:
            conf.write(PRIMARY_SETTINGS.format(standby=STANDBY_NAME))
            conf.write(f"port = {primary.port}\nunix_socket_directories = '{primary.socket_dir}'\n")
        primary.start()

        run_as_postgres([str(PG_BIN / "pg_basebackup"), "-D", str(standby.data), "-h", "127.0.0.1",
                         "-p", str(primary.port), "-U", PG_USER, "-R", "-X", "stream", "-c", "fast", "--no-sync"],
                        cwd=self.base)
        # postgresql.auto.conf is read last: these override what the base backup copied from the primary.
        with open(standby.data / "postgresql.auto.conf", "a") as conf:
            conf.write(
                f"port = {standby.port}\n"
                f"primary_conninfo = 'host=127.0.0.1 port={primary.port} user={PG_USER} "
                f"application_name={STANDBY_NAME}'\n"
                # Once promoted, nobody to wait for: it must accept writes alone.
                "synchronous_standby_names = ''\n"
            )
        if self.clock_offset_seconds:
            assert LIBFAKETIME is not None
            # pg_ctl too: it and the server it starts see the same (shifted) clock.
            standby.env = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": f"{self.clock_offset_seconds:+}",
                           "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                           # No semaphore shared between the faked processes: a fixed offset needs none.
                           "FAKETIME_DISABLE_SHM": "1"}
        standby.start()
        self.wait_sync()
        self.build_seconds = time.monotonic() - started

    def close(self) -> None:
        """Stop both servers (immediate), kill whatever is left, delete the directory; safe twice."""
        for server in (self.standby, self.primary):
            if server is not None:
                server.stop()
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def _servers(self) -> tuple[PgServer, PgServer]:
        if self.primary is None or self.standby is None:
            raise RuntimeError("the pair is not built")
        return self.primary, self.standby

    # --- what tests connect to ------------------------------------------------------------------------------

    @property
    def primary_port(self) -> int:
        return self._servers()[0].port

    @property
    def standby_port(self) -> int:
        return self._servers()[1].port

    def url(self, database: str = "postgres") -> str:
        """Both servers in the libpq multi-host form, read-write only: whichever is the primary now."""
        return (f"postgresql://{PG_USER}@127.0.0.1:{self.primary_port},127.0.0.1:{self.standby_port}/{database}"
                "?target_session_attrs=read-write")

    def primary_url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.primary_port}/{database}"

    def standby_url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.standby_port}/{database}"

    def psql(self, sql: str, *, standby: bool = False, database: str = "postgres") -> str:
        """Run SQL with psql on the primary (or the standby) and return its unaligned, tuples-only output."""
        port = self.standby_port if standby else self.primary_port
        assert self.base is not None
        return run_as_postgres([str(PG_BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                                "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, "-d", database, "-c", sql],
                               cwd=self.base, timeout=60).stdout.strip()

    def create_database(self, name: str) -> None:
        """CREATE DATABASE on the primary, and wait until the standby has replayed it (can be connected to)."""
        self.psql(f'CREATE DATABASE "{name}"')
        if self.standby_pid() is not None and self.primary_pid() is not None:
            self.wait_replayed()

    def wait_replayed(self, timeout: float = 30) -> None:
        """Until the standby has replayed everything the primary wrote so far.

        A synchronous commit (``synchronous_commit = on``) returns once the standby has *flushed* it; replay,
        which makes it visible there, follows within moments: wait for this before reading on the standby.
        """
        target = self.psql("SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + timeout
        while True:
            caught_up = self.psql(f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn", standby=True)
            if caught_up == "t":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"standby has not replayed up to {target} after {timeout}s")
            time.sleep(0.05)

    def sync_state(self) -> str | None:
        """The standby's ``sync_state`` in the primary's ``pg_stat_replication`` (``None`` when not streaming)."""
        state = self.psql(f"SELECT sync_state FROM pg_stat_replication WHERE application_name = '{STANDBY_NAME}'")
        return state or None

    def wait_sync(self, timeout: float = 60) -> None:
        """Until the primary has the standby streaming as its synchronous standby (``sync_state = 'sync'``)."""
        deadline = time.monotonic() + timeout
        state: str | None = None
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                state = self.sync_state()
                if state == "sync":
                    return
            time.sleep(0.2)
        primary, standby = self._servers()
        raise TimeoutError(f"standby not synchronous after {timeout}s (sync_state {state!r})\n"
                           f"--- primary log\n{primary.log_tail()}\n--- standby log\n{standby.log_tail()}")

    # --- faults ----------------------------------------------------------------------------------------------

    def primary_pid(self) -> int | None:
        """The primary's postmaster pid (``None`` when it is not running)."""
        return self._servers()[0].postmaster_pid()

    def standby_pid(self) -> int | None:
        """The standby's postmaster pid (``None`` when it is not running)."""
        return self._servers()[1].postmaster_pid()

    def kill_primary(self) -> None:
        """kill -9 of the primary's postmaster and all its processes, as if its machine had died."""
        self._servers()[0].kill()

    def kill_standby(self) -> None:
        """kill -9 of the standby: synchronous commits on the primary then wait (as they would in production)."""
        self._servers()[1].kill()

    def promote_standby(self) -> None:
        """``pg_ctl promote -w``: the standby becomes a primary accepting writes."""
        self._servers()[1].pg_ctl("promote", "-w", "-t", "60")
