"""Test support: isolated database and vhost, and the real processes (gateway, worker) run as subprocesses.

Everything talks to the real PostgreSQL and RabbitMQ named by DATABASE_URL / AMQP_URL. Each test run creates
its own database and its own RabbitMQ vhost and removes them at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

# Shared with the benchmark, which manages the same kind of isolated database and vhost.
from bench.stack import free_port, with_database
from shared.migrate import migrate
from tests.helpers import eventually, eventually_blocking

ROOT = Path(__file__).resolve().parent.parent
ADMIN_DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
ADMIN_AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RUN_ID = uuid.uuid4().hex[:8]

_counter = itertools.count(1)


def unique_user(prefix: str = "u") -> str:
    return f"{prefix}_{RUN_ID}_{next(_counter)}"


_phone_counter = itertools.count(int(time.time() * 1000) % 10_000_000)


def unique_phone() -> str:
    """A valid, run-unique mainland mobile number (1[3-9]xxxxxxxxx)."""
    return f"15{next(_phone_counter) % 1_000_000_000:09d}"


def have_rabbitmqctl() -> bool:
    return shutil.which("rabbitmqctl") is not None


async def _admin() -> asyncpg.Connection:
    """A connection to the server's admin database, retried while PostgreSQL (re)starts (fault tests restart it)."""

    async def connected() -> asyncpg.Connection | None:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            return await asyncpg.connect(ADMIN_DATABASE_URL)
        return None

    return await eventually(connected, within=60, interval=1, what="PostgreSQL accepting connections")


async def create_database(name: str, *, migrated: bool = True) -> str:
    """A new database on the test server (migrated unless told otherwise); returns its URL."""
    admin = await _admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(ADMIN_DATABASE_URL, name)
    if migrated:
        await migrate(url)
    return url


async def drop_database(name: str) -> None:
    """Drop the database, whoever is still connected to it."""
    admin = await _admin()
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


class Process:
    """A subprocess of a test whose output goes to a log file; waits on it fail at once if it exits."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_path: Path, *, new_session: bool = False
    ) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=new_session
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_until(self, check: Callable[[], bool], what: str, timeout: float = 30) -> None:
        """Until ``check()`` holds; fails at once if the process exits, and names the process and its output."""

        def holds() -> bool:
            if check():
                return True
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before {what}")
            return False

        try:
            eventually_blocking(holds, within=timeout, what=f"{self.name} {what}")
        except AssertionError as failure:
            raise AssertionError(f"{failure}\n{self.output()}") from None

    def wait_logged(self, text: str, timeout: float = 30, count: int = 1) -> None:
        """Until ``text`` is in the output (``count`` times)."""
        self.wait_until(lambda: self.output().count(text) >= count, f"logging {text!r}", timeout)

    async def logged(self, text: str, within: float = 30) -> None:
        """``wait_logged`` for async tests: the event loop keeps running meanwhile."""

        async def found() -> bool:
            return text in self.output()

        await eventually(found, within=within, what=f"{self.name} logging {text!r}")


class Proc(Process):
    """One of our processes (``python -m gateway`` / ``python -m worker``) with its log file."""

    def __init__(self, module: str, env: dict[str, str], log_path: Path) -> None:
        self.module = module
        super().__init__(module, [sys.executable, "-m", module], env, log_path)

    def kill(self) -> None:
        """kill -9: no chance to ack, reply or clean up."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait for the process to exit; returns its exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout)

    def stop(self) -> None:
        try:
            self.terminate(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        self.log.close()


class Gateway(Proc):
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = int(env["PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__("gateway", env, log_path)

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until GET /readyz answers 200 (the gateway can accept writes)."""

        def ready() -> bool:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                return bool(response.status == 200)
            return False

        self.wait_until(ready, "ready (GET /readyz 200)", timeout)


class Worker(Proc):
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.metrics_url = f"http://127.0.0.1:{env.get('METRICS_PORT', '9100')}/metrics"
        super().__init__("worker", env, log_path)

    def wait_consuming(self, timeout: float = 30) -> None:
        self.wait_logged("consuming", timeout)


class Stack:
    """Gateways and workers of one isolated environment (database + vhost + queue prefix)."""

    def __init__(self, database_url: str, amqp_url: str, prefix: str, log_dir: Path, **overrides: Any) -> None:
        self.database_url = database_url
        self.amqp_url = amqp_url
        self.prefix = prefix
        self.log_dir = log_dir
        self.overrides = {key.upper(): str(value) for key, value in overrides.items()}
        self.procs: list[Proc] = []

    def env(self, **overrides: Any) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=self.database_url,
            AMQP_URL=self.amqp_url,
            AMQP_PREFIX=self.prefix,
            HOST="127.0.0.1",
            PYTHONUNBUFFERED="1",
            LOG_LEVEL="INFO",
            # Several shards in tests, whatever the default, so routing by userId is exercised.
            SHARD_COUNT="8",
        )
        env.update(self.overrides)
        env.update({key.upper(): str(value) for key, value in overrides.items()})
        return env

    def start_worker(self, wait: bool = True, **overrides: Any) -> Worker:
        n = sum(isinstance(p, Worker) for p in self.procs) + 1
        overrides.setdefault("METRICS_PORT", free_port())  # several workers on one host
        worker = Worker(self.env(**overrides), self.log_dir / f"worker-{n}.log")
        self.procs.append(worker)
        if wait:
            worker.wait_consuming()
        return worker

    def start_gateway(self, wait: bool = True, **overrides: Any) -> Gateway:
        n = sum(isinstance(p, Gateway) for p in self.procs) + 1
        overrides.setdefault("PORT", free_port())
        gateway = Gateway(self.env(**overrides), self.log_dir / f"gateway-{n}.log")
        self.procs.append(gateway)
        if wait:
            gateway.wait_healthy()
        return gateway

    def gateway(self) -> Gateway:
        """The first gateway started."""
        return next(proc for proc in self.procs if isinstance(proc, Gateway))

    def workers(self) -> list[Worker]:
        return [proc for proc in self.procs if isinstance(proc, Worker)]

    def stop(self) -> None:
        """Stop every process, then remove the stack's queues and exchanges."""
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        self.delete_broker_objects()

    def delete_broker_objects(self) -> None:
        """Delete this stack's queues and exchanges (its prefix) from the run's vhost.

        Every stack declares a quorum queue per shard; left until the vhost goes at the end of the run, the
        hundreds of them a full run creates slow the broker down for every later test.
        """
        if not have_rabbitmqctl():
            return
        vhost = urllib.parse.unquote(urllib.parse.urlsplit(self.amqp_url).path[1:]) or "/"

        def names(kind: str) -> list[str]:
            listing = subprocess.run(["rabbitmqctl", f"list_{kind}", "-q", "-p", vhost, "name"],
                                     capture_output=True, text=True, timeout=60, check=False).stdout.split()
            return [name for name in listing if name.startswith(f"{self.prefix}.")]

        async def delete(queues: list[str], exchanges: list[str]) -> None:
            with contextlib.suppress(Exception):  # best effort: a restricted test user may not delete
                connection = await aio_pika.connect(self.amqp_url)
                async with connection:
                    channel = await connection.channel()
                    for queue in queues:
                        await channel.queue_delete(queue)
                    for exchange in exchanges:
                        await channel.exchange_delete(exchange)

        queues, exchanges = names("queues"), names("exchanges")
        if queues or exchanges:
            # A thread of its own: the caller may be inside pytest-asyncio's running loop.
            worker = threading.Thread(target=asyncio.run, args=(delete(queues, exchanges),), daemon=True)
            worker.start()
            worker.join(timeout=60)
