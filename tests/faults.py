"""Causing real faults: stopping RabbitMQ or PostgreSQL, always restarting them, even when a test fails."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable

from tests.helpers import eventually_blocking


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def rabbit_stop_app() -> None:
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)


def rabbit_start_app() -> None:
    subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=180)
    subprocess.run(["rabbitmqctl", "await_startup"], check=False, capture_output=True, timeout=180)
    eventually_blocking(lambda: _port_open(5672), within=60, interval=0.2, what="RabbitMQ listening on 5672")


@contextlib.asynccontextmanager
async def _stopped(stop: Callable[[], None], start: Callable[[], None]) -> AsyncIterator[None]:
    """``stop()`` before the block, ``start()`` after it, whatever happened inside (each in a thread)."""
    await asyncio.to_thread(stop)
    try:
        yield
    finally:
        await asyncio.to_thread(start)


def rabbit_down() -> contextlib.AbstractAsyncContextManager[None]:
    """RabbitMQ's app stopped inside the block (the Erlang node stays up); restarted on the way out."""
    return _stopped(rabbit_stop_app, rabbit_start_app)


def _pg_version() -> str:
    versions = sorted(os.path.basename(p) for p in glob.glob("/etc/postgresql/*"))
    return versions[-1] if versions else "15"


def postgres_stop() -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", "stop", "-m", "fast"],
        check=True, capture_output=True, timeout=120,
    )


def postgres_start() -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", "start"],
        check=False, capture_output=True, timeout=120,
    )

    def ready() -> bool:
        answer = subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432"], capture_output=True, check=False)
        return answer.returncode == 0

    eventually_blocking(ready, within=60, interval=0.3, what="PostgreSQL ready (pg_isready)")


def postgres_down() -> contextlib.AbstractAsyncContextManager[None]:
    """PostgreSQL stopped inside the block; started again on the way out, whatever happened."""
    return _stopped(postgres_stop, postgres_start)
