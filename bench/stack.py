"""What a benchmark run stands on: its own database and vhost, the server processes, and /proc readings.

Everything here is created for one run and removed by ``BenchStack.close()``, which is safe to call after a
partial start, twice, or from a ``finally`` reached by Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg

from shared.brokers import node_urls
from shared.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def with_database(url: str, database: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{database}"))


def with_vhost(url: str, vhost: str) -> str:
    """``url`` (or every URL of an AMQP_URL node list) with its path set to ``vhost``."""
    path = "/" + urllib.parse.quote(vhost, safe="")
    return ",".join(urllib.parse.urlunsplit(urllib.parse.urlsplit(node)._replace(path=path))
                    for node in node_urls(url))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=True)


# --- /proc readings -----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) in KiB (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores together."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user time
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def rabbitmq_pids() -> list[int]:
    """The RabbitMQ server's Erlang VM (read-only: to account its CPU); rabbitmqctl's own VMs are left out."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() != "beam.smp":
                    continue
                if b"escript" not in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


# --- processes ----------------------------------------------------------------------------------------------


class Server:
    """One server process of the run (gateway, worker or baseline), in its own session, logging to a file."""

    def __init__(self, name: str, module: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        # start_new_session: Ctrl-C in the terminal reaches only us; we stop the servers in order.
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module], env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if not self.alive():
            tail = "\n".join(self.output().splitlines()[-30:])
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def stop(self, timeout: float = 30) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self.log.close()


async def wait_http_ok(server: Server, url: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            server.check_alive()
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{server.name} not healthy at {url} after {within}s")


async def wait_log_line(server: Server, text: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        server.check_alive()
        if text in server.output():
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{server.name} did not log {text!r} after {within}s")


# --- the stack ----------------------------------------------------------------------------------------------


@dataclass
class BenchStack:
    """A fresh database + vhost (or queue prefix), one gateway, N workers and the baseline server."""

    admin_database_url: str
    admin_amqp_url: str
    run_id: str
    log_dir: Path
    database: str = ""
    vhost: str | None = None
    database_url: str = ""
    amqp_url: str = ""
    prefix: str = ""
    gateway: Server | None = None
    workers: list[Server] = field(default_factory=list)
    baseline: Server | None = None
    gateway_url: str = ""
    baseline_url: str = ""

    async def create_storage(self) -> None:
        """The database (migrated) and the RabbitMQ vhost; without rabbitmqctl, a queue prefix of its own."""
        self.database = f"crm_bench_{self.run_id}"
        admin = await asyncpg.connect(self.admin_database_url)
        try:
            await admin.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await admin.close()
        self.database_url = with_database(self.admin_database_url, self.database)
        await migrate(self.database_url)

        self.prefix = f"bench{self.run_id}"
        self.amqp_url = self.admin_amqp_url
        if shutil.which("rabbitmqctl") is not None:
            try:
                vhost = f"crm_bench_{self.run_id}"
                rabbitmqctl("add_vhost", vhost)
                self.vhost = vhost
                user = urllib.parse.urlsplit(node_urls(self.admin_amqp_url)[0]).username or "guest"
                rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
                self.amqp_url = with_vhost(self.admin_amqp_url, vhost)
            except (OSError, subprocess.SubprocessError) as exc:
                print(f"rabbitmqctl failed ({exc}); using queue prefix {self.prefix} instead", file=sys.stderr)

    def server_env(self, **overrides: str) -> dict[str, str]:
        env = dict(os.environ)  # pipeline knobs (WORKER_BATCH_SIZE, ...) pass through from the caller
        env.setdefault("LOG_LEVEL", "INFO")
        env.update(
            DATABASE_URL=self.database_url,
            AMQP_URL=self.amqp_url,
            AMQP_PREFIX=self.prefix,
            HOST="127.0.0.1",
            PYTHONUNBUFFERED="1",
        )
        env.update(overrides)
        return env

    async def start_servers(self, workers: int) -> None:
        for n in range(1, workers + 1):
            env = {**self.server_env(), "METRICS_PORT": str(free_port())}
            worker = Server(f"worker-{n}", "worker", env, self.log_dir / f"worker-{n}.log")
            self.workers.append(worker)
        for worker in self.workers:
            await wait_log_line(worker, "consuming")

        port = free_port()
        self.gateway = Server("gateway", "gateway", self.server_env(PORT=str(port)), self.log_dir / "gateway.log")
        self.gateway_url = f"http://127.0.0.1:{port}"
        port = free_port()
        self.baseline = Server(
            "baseline", "bench.baseline", self.server_env(PORT=str(port)), self.log_dir / "baseline.log"
        )
        self.baseline_url = f"http://127.0.0.1:{port}"
        await wait_http_ok(self.gateway, f"{self.gateway_url}/healthz")
        await wait_http_ok(self.baseline, f"{self.baseline_url}/healthz")

    def pipeline_metrics_urls(self) -> list[str]:
        """The Prometheus endpoints of the pipeline: the gateway's /metrics and each worker's METRICS_PORT."""
        urls = [f"{self.gateway_url}/metrics"] if self.gateway else []
        return urls + [f"http://127.0.0.1:{worker.env['METRICS_PORT']}/metrics" for worker in self.workers]

    def pipeline_pids(self) -> dict[str, int]:
        pids = {"gateway": self.gateway.pid} if self.gateway else {}
        pids.update({worker.name: worker.pid for worker in self.workers})
        return pids

    def check_alive(self) -> None:
        for server in self.servers():
            server.check_alive()

    def servers(self) -> list[Server]:
        return [s for s in (self.gateway, *self.workers, self.baseline) if s is not None]

    async def reset_data(self) -> None:
        """Empty tables and a checkpoint, so every run starts from the same state."""
        conn = await asyncpg.connect(self.database_url)
        try:
            await conn.execute("TRUNCATE customers, processed_requests RESTART IDENTITY")
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()

    async def count_customers(self) -> tuple[int, int]:
        """(rows, rows with a phone) in ``customers``."""
        conn = await asyncpg.connect(self.database_url)
        try:
            row = await conn.fetchrow("SELECT count(*) AS n, count(phone) AS phones FROM customers")
        finally:
            await conn.close()
        return int(row["n"]), int(row["phones"])

    async def postgres_backend_pids(self) -> list[int]:
        conn = await asyncpg.connect(self.database_url)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", self.database
            )
        finally:
            await conn.close()
        return [int(row["pid"]) for row in rows]

    async def close(self) -> None:
        """Stop every process (workers last, so in-flight work drains), drop the database and the vhost."""
        for server in (self.gateway, self.baseline, *self.workers):
            if server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(server.stop)
        self.gateway, self.baseline, self.workers = None, None, []
        if self.database:
            with contextlib.suppress(Exception):
                await _drop_database(self.admin_database_url, self.database)
            self.database = ""
        if self.vhost is not None:
            with contextlib.suppress(Exception):
                rabbitmqctl("delete_vhost", self.vhost)
            self.vhost = None


async def _drop_database(admin_url: str, database: str) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await admin.close()
