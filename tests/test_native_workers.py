"""Issue 13, defect 3: "as many workers as you like" on one machine, started the README's way.

``make run-worker`` twice, in two "terminals" (process groups), with no METRICS_PORT set: both workers must
run, each serving its own ``/metrics`` (the first on 9100 or, when that is taken, the next free port; the
port is logged), and both stop cleanly on Ctrl-C (SIGINT to each terminal's process group). The Makefile is
told not to reinstall the venv (``-o``): the suite runs in it already.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp

from tests.support import ROOT, Process, Stack

METRICS_LINE = re.compile(r"metrics on http://[^:]+:(\d+)/metrics")


class Terminal(Process):
    """``make run-worker`` in a process group of its own, as a shell would run it in a terminal."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        venv = Path(sys.prefix)
        argv = ["make", "--no-print-directory", "-o", f"{venv}/bin/.installed", "run-worker", f"VENV={venv}"]
        super().__init__("`make run-worker`", argv, env, log_path, new_session=True)

    def metrics_port(self) -> int:
        match = METRICS_LINE.search(self.output())
        assert match is not None, self.output()
        return int(match[1])

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to the terminal's foreground process group (make and the worker)."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGINT)
        self.popen.wait(timeout=60)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            self.interrupt()
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=30)
        self.log.close()


@contextlib.contextmanager
def terminals(env: dict[str, str], log_dir: Path, count: int) -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    try:
        for n in range(1, count + 1):
            opened.append(Terminal(env, log_dir / f"terminal-{n}.log"))
            opened[-1].wait_logged("worker consuming", timeout=60)  # one after the other, as a person would
        yield opened
    finally:
        for terminal in opened:
            terminal.stop()


async def test_two_workers_started_the_readme_way_on_one_machine_both_run(
    make_stack: Callable[..., Stack], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    stack = make_stack()
    env = {key: value for key, value in stack.env().items() if key not in ("METRICS_PORT", "MAKEFLAGS")}

    with terminals(env, tmp_path, 2) as (first, second):
        assert first.popen.poll() is None and second.popen.poll() is None
        ports = [first.metrics_port(), second.metrics_port()]
        assert ports[0] != ports[1], ports
        assert all(9100 <= port < 9200 for port in ports), ports  # the default, or the next free ones
        for port in ports:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
                assert "crm_worker_requests_applied_total" in await response.text()
        for terminal in (first, second):
            terminal.interrupt()
            assert "worker stopped" in terminal.output(), terminal.output()
            assert "Traceback" not in terminal.output(), terminal.output()


def test_an_explicit_metrics_port_that_is_taken_still_fails_the_start(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    """METRICS_PORT set (as compose sets 9100) means that port: taken, the start fails with the one line."""
    stack = make_stack()
    first = stack.start_worker()
    taken = first.metrics_url.rsplit(":", 1)[1].split("/")[0]
    env = {**stack.env(), "METRICS_PORT": taken}
    result = subprocess.run([sys.executable, "-m", "worker"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1, result
    assert f"{taken} (METRICS_PORT): address already in use" in result.stderr + result.stdout, result
