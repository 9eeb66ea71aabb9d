"""``make run``: the whole system natively in one command, stopped cleanly by one signal (scripts/supervise.py).

Each test runs ``make run`` as a person would in a terminal (a process group of its own), against this run's
database and vhost with a queue prefix of its own, the gateway on a free PORT and the workers' metrics on two
free ports from METRICS_PORT up; WORKERS is left unset (the default, 2). The Makefile is told not to reinstall
the venv (``-o``): the suite runs in it already.

How it is stopped decides what ``make`` itself answers: a SIGTERM to the supervisor (as a process manager sends
it) ends ``make`` with 0; Ctrl-C reaches ``make`` too, and make reports any SIGINT it got as an interrupt
(whatever its recipe did); a SIGTERM to ``make`` kills make at once without passing it on, so the supervisor
hears of it through the parent-death signal (Linux) and drains all the same.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from bench.stack import free_port
from tests.helpers import eventually_blocking
from tests.support import Process, Stack, unique_user

PROCESSES = ("worker-1", "worker-2", "gateway")
STARTED = re.compile(r"^run +\| started (\S+) \(pid (\d+)\)$", re.MULTILINE)
SUPERVISOR = re.compile(r"supervisor pid (\d+)")
ALL_STOPPED_CLEANLY = "all 3 processes stopped cleanly"


class MakeRun(Process):
    """``make run`` in a process group of its own, its output in a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = int(env["PORT"])
        self.metrics_port = int(env["METRICS_PORT"])
        venv = Path(sys.prefix)
        argv = ["make", "--no-print-directory", "-o", f"{venv}/bin/.installed", "run", f"VENV={venv}"]
        super().__init__("`make run`", argv, env, log_path, new_session=True)

    def lines(self, name: str) -> list[str]:
        """The lines a process wrote (without the ``name |`` prefix)."""
        return [line.split("| ", 1)[1] for line in self.output().splitlines() if line.startswith(f"{name} ")]

    def wait_running(self) -> None:
        self.wait_logged("worker consuming", timeout=90, count=2)
        self.wait_logged("gateway listening", timeout=90)

    def supervisor_pid(self) -> int:
        match = SUPERVISOR.search(self.output())
        assert match is not None, self.output()
        return int(match[1])

    def pids(self) -> dict[str, int]:
        return {name: int(pid) for name, pid in STARTED.findall(self.output())}

    def wait_exit(self, timeout: float = 90) -> int:
        return self.popen.wait(timeout=timeout)

    def close(self) -> None:
        """Whatever a failed test left running: the supervisor stops its processes on SIGTERM."""
        with contextlib.suppress(ProcessLookupError, AssertionError):
            os.kill(self.supervisor_pid(), signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=60)
        for pid in self.pids().values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


def two_free_ports() -> int:
    """A port ``p`` with ``p`` and ``p + 1`` both free (the two workers' METRICS_PORT)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


def gone(pid: int) -> bool:
    """No such process any more (a zombie counts as gone: it has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    eventually_blocking(lambda: all(gone(pid) for pid in pids), within=timeout, what=f"processes {pids} gone")


@pytest.fixture
def make_run(make_stack: Callable[..., Stack], tmp_path: Path) -> Iterator[MakeRun]:
    stack = make_stack()  # the queue prefix and its clean-up; its processes are the supervisor's here
    env = {key: value for key, value in stack.env().items() if key not in ("MAKEFLAGS", "WORKERS")}
    env.update(PORT=str(free_port()), METRICS_PORT=str(two_free_ports()))
    run = MakeRun(env, tmp_path / "make-run.log")
    try:
        run.wait_running()
        yield run
    finally:
        run.close()


def assert_stopped_cleanly(run: MakeRun) -> None:
    """Every process logged its own clean stop, the supervisor saw each exit 0, nothing is left running."""
    for name in PROCESSES:
        process = name.split("-")[0]
        assert any(f"{process} stopped" in line for line in run.lines(name)), run.output()
    assert ALL_STOPPED_CLEANLY in run.output(), run.output()
    assert "Traceback" not in run.output(), run.output()
    wait_gone([*run.pids().values(), run.supervisor_pid()])


async def test_make_run_serves_requests_and_one_sigterm_stops_every_process_cleanly(
    make_run: MakeRun, http: aiohttp.ClientSession
) -> None:
    body = {"userId": unique_user("makerun"), "name": "张三"}
    async with http.post(f"http://127.0.0.1:{make_run.port}/api/external/customers", json=body) as response:
        assert response.status == 201, await response.text()
    for port in (make_run.metrics_port, make_run.metrics_port + 1):  # each worker its own
        async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
    assert all(line.startswith(("run ", "migrate ", *PROCESSES)) for line in make_run.output().splitlines()[1:])

    os.kill(make_run.supervisor_pid(), signal.SIGTERM)

    assert make_run.wait_exit() == 0, make_run.output()
    assert_stopped_cleanly(make_run)
    output = make_run.output()
    assert output.index("gateway stopped") < output.index("worker stopping"), output  # the gateway drains first


def test_ctrl_c_stops_every_process_cleanly(make_run: MakeRun) -> None:
    os.killpg(make_run.popen.pid, signal.SIGINT)  # the terminal's Ctrl-C: make and the supervisor

    assert make_run.wait_exit() == -signal.SIGINT, make_run.output()  # make's own answer to a SIGINT
    assert_stopped_cleanly(make_run)


def test_a_process_that_dies_stops_the_others_and_fails_the_run(make_run: MakeRun) -> None:
    os.kill(make_run.pids()["worker-1"], signal.SIGKILL)

    assert make_run.wait_exit() == 2, make_run.output()  # make: the recipe failed (the supervisor's exit 1)
    output = make_run.output()
    assert "worker-1 exited on its own (killed by SIGKILL): stopping the others" in output, output
    assert "stopped, not cleanly: gateway exit 0, worker-1 killed by SIGKILL, worker-2 exit 0" in output, output
    assert any("worker stopped" in line for line in make_run.lines("worker-2")), output
    wait_gone([*make_run.pids().values(), make_run.supervisor_pid()])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigterm_to_make_itself_still_drains_every_process(make_run: MakeRun) -> None:
    os.kill(make_run.popen.pid, signal.SIGTERM)  # make dies at once and passes nothing on

    assert make_run.wait_exit() == -signal.SIGTERM
    eventually_blocking(lambda: ALL_STOPPED_CLEANLY in make_run.output(), within=60, what="the supervisor's drain")
    assert_stopped_cleanly(make_run)
