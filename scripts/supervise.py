"""``make run``: the whole system natively, in one terminal (``python scripts/supervise.py --workers N``).

Flow: ``python -m shared.migrate`` (it must exit 0, or nothing else starts) → N × ``python -m worker``, each with
a METRICS_PORT of its own (METRICS_PORT, 9100 unless set, then the next ones up; 0 keeps metrics off) and
``python -m gateway``, all at once (the gateway declares the queues too) → every line any of them writes goes
to stdout prefixed with its name (``worker-1 | …``), interleaved as written.

Stopping: on Ctrl-C (SIGINT), SIGTERM or SIGHUP the gateway gets SIGTERM first (it stops listening, and its
in-flight requests get their outcome from the workers, still running), then the workers (each drains); a
process still running SHUTDOWN_DEADLINE + ``KILL_GRACE`` seconds after its SIGTERM is killed. Exit 0 when every
process exited 0, else 1. A process exiting on its own (a crash, a refused start) stops the others the same
way, and the exit is 1.

The processes run in a session of their own, so a terminal's Ctrl-C reaches only this supervisor (and make),
and the order above holds. On Linux nothing outlives it: each process gets SIGTERM should the supervisor die
without stopping it, and the supervisor gets SIGTERM should its parent die first (``make``, which dies of a
SIGTERM without passing it on).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from shared.cli import EXIT_CODES, EXIT_FAILURE, EXIT_OK, load_settings_or_exit

KILL_GRACE: Final = 10.0  # seconds past SHUTDOWN_DEADLINE before a process that has not exited is killed
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
READ_CHUNK: Final = 65536
SELF: Final = "run"  # the prefix of the supervisor's own lines

DESCRIPTION = """\
Run the whole system in one terminal: migrate the database, then WORKERS workers (each with its own
METRICS_PORT: 9100, 9101, ... or up from METRICS_PORT) and the gateway, their output interleaved with a name
in front of every line. Ctrl-C or SIGTERM stops the gateway, then the workers, each draining as on its own.
Exits 0 when every process stopped cleanly, 1 when one failed or exited on its own."""


@dataclass(frozen=True)
class Console:
    """This terminal: every line written as ``name | line``, names padded to ``width``."""

    width: int

    def say(self, message: str) -> None:
        """A line of the supervisor's own."""
        self._write(f"{SELF.ljust(self.width)} | {message}\n".encode())

    async def relay(self, name: str, stream: asyncio.StreamReader) -> None:
        """Every line of ``stream`` as ``name | line`` (a last line without a newline too)."""
        head = f"{name.ljust(self.width)} | ".encode()
        pending = b""
        while chunk := await stream.read(READ_CHUNK):
            *lines, pending = (pending + chunk).split(b"\n")
            if lines:
                self._write(b"".join(head + line + b"\n" for line in lines))
        if pending:
            self._write(head + pending + b"\n")

    @staticmethod
    def _write(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


@dataclass
class Child:
    """One process of the system, its output relayed to the console with ``name`` in front."""

    name: str
    module: str
    env: dict[str, str]
    console: Console = field(default_factory=lambda: Console(0), repr=False)
    process: asyncio.subprocess.Process | None = None
    relay: asyncio.Task[None] | None = field(default=None, repr=False)

    async def start(self, console: Console) -> None:
        self.console = console
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", self.module, env=self.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        assert self.process.stdout is not None
        self.relay = asyncio.create_task(self.console.relay(self.name, self.process.stdout))
        self.console.say(f"started {self.name} (pid {self.process.pid})")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def wait(self) -> int:
        """The exit status, once the process has exited and all its output is relayed."""
        assert self.process is not None and self.relay is not None
        status = await self.process.wait()
        await asyncio.shield(self.relay)  # a cancelled wait must not cut the output short
        return status

    async def stop(self, kill_after: float) -> int:
        """SIGTERM, then the exit status; SIGKILL if it is still running ``kill_after`` seconds later."""
        assert self.process is not None
        if self.running:
            with contextlib.suppress(ProcessLookupError):  # it may have exited since
                self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.wait(), kill_after)
        except TimeoutError:
            self.console.say(f"{self.name} still running {kill_after:g}s after SIGTERM: killing it")
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            return await self.wait()


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the parent dies (PR_SET_PDEATHSIG). Elsewhere: nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def worker_metrics_port(base: int, n: int) -> int:
    """The METRICS_PORT of worker ``n`` (from 1): ``base``, ``base`` + 1, ...; 0 (metrics off) stays 0."""
    return base + n - 1 if base else 0


def describe_exit(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit {status}"


async def supervise(workers: int, base_metrics_port: int, kill_after: float) -> int:
    """Migrate, run the system until a stop signal or a process exits, stop it; the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each log line through the pipe as it is written
    migrate = Child("migrate", "shared.migrate", env)
    worker_list = [
        Child(f"worker-{n}", "worker", {**env, "METRICS_PORT": str(worker_metrics_port(base_metrics_port, n))})
        for n in range(1, workers + 1)
    ]
    gateway = Child("gateway", "gateway", env)
    console = Console(width=max(len(child.name) for child in [migrate, *worker_list, gateway]))
    console.say(f"supervisor pid {os.getpid()}: migrate, then {workers} workers and the gateway; Ctrl-C stops them")

    await migrate.start(console)
    if await _until_stop_or_exit(stop, [migrate]) == []:
        console.say("stop requested during the migration")
        await migrate.stop(kill_after)
        return EXIT_FAILURE
    migrated = await migrate.wait()
    if migrated != 0:
        console.say(f"migration failed ({describe_exit(migrated)}): nothing started")
        return EXIT_FAILURE

    for child in [*worker_list, gateway]:
        await child.start(console)
    exited = await _until_stop_or_exit(stop, [*worker_list, gateway])
    for child in exited:
        console.say(f"{child.name} exited on its own ({describe_exit(await child.wait())}): stopping the others")
    if not exited:
        console.say("stopping: the gateway first (its in-flight requests get their answers), then the workers")

    statuses = {gateway.name: await gateway.stop(kill_after)}
    worker_statuses = await asyncio.gather(*(worker.stop(kill_after) for worker in worker_list))
    statuses.update((worker.name, status) for worker, status in zip(worker_list, worker_statuses, strict=True))
    if exited or any(status != 0 for status in statuses.values()):
        said = ", ".join(f"{name} {describe_exit(status)}" for name, status in statuses.items())
        console.say(f"stopped, not cleanly: {said}")
        return EXIT_FAILURE
    console.say(f"all {len(statuses)} processes stopped cleanly")
    return EXIT_OK


async def _until_stop_or_exit(stop: asyncio.Event, children: list[Child]) -> list[Child]:
    """Wait until ``stop`` is set or one of ``children`` exits; the children that have exited by then."""
    exits = {asyncio.ensure_future(child.wait()): child for child in children}
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([stopped, *exits], return_when=asyncio.FIRST_COMPLETED)
    for task in [stopped, *exits]:
        task.cancel()  # a child's wait is cancelled, not the child: it is waited for again when stopped
    return [child for task, child in exits.items() if task in done]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python scripts/supervise.py", description=DESCRIPTION, epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="worker processes to run (default 2)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    settings = load_settings_or_exit()  # a bad setting is one line here, before anything starts
    _die_with_parent()  # started by make: make dies of a SIGTERM without passing it on
    kill_after = settings.shutdown_deadline + KILL_GRACE
    raise SystemExit(asyncio.run(supervise(args.workers, settings.metrics_port, kill_after)))


if __name__ == "__main__":
    main()
