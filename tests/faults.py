"""Causing real faults: stopping RabbitMQ or PostgreSQL, always restarting them, even when a test fails."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def rabbit_stop_app() -> None:
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)


def rabbit_start_app() -> None:
    subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=180)
    subprocess.run(["rabbitmqctl", "await_startup"], check=False, capture_output=True, timeout=180)
    deadline = time.monotonic() + 60
    while not _port_open(5672) and time.monotonic() < deadline:
        time.sleep(0.2)


@contextlib.asynccontextmanager
async def rabbit_down() -> AsyncIterator[None]:
    """RabbitMQ's app stopped inside the block (the Erlang node stays up); restarted on the way out."""
    await asyncio.to_thread(rabbit_stop_app)
    try:
        yield
    finally:
        await asyncio.to_thread(rabbit_start_app)


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
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432"], capture_output=True, check=False)
        if ready.returncode == 0:
            return
        time.sleep(0.3)


@contextlib.asynccontextmanager
async def postgres_down() -> AsyncIterator[None]:
    """PostgreSQL stopped inside the block; started again on the way out, whatever happened."""
    await asyncio.to_thread(postgres_stop)
    try:
        yield
    finally:
        await asyncio.to_thread(postgres_start)
