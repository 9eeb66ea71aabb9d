"""One timeline for every process: the database server's clock, as seen through a measured offset.

Write stamps must order a user's requests causally across any number of gateways, whatever their wall clocks
say. So no process stamps with its own wall clock: each measures the offset between its monotonic clock and
Postgres' ``clock_timestamp()`` every ``CLOCK_SYNC_INTERVAL`` seconds (``shared.offset``: NTP-style, corrected
by half the round trip, the least-delayed recent sample wins) and reads time as ``monotonic + offset``.

    now_us()   database time now, to within error_bound_us() (half a database round trip, plus drift
               since the last sample while Postgres is away)
    stamp()    a HybridClock on that timeline: strictly increasing within the process

Failure modes, and what happens:
* Postgres away after the first sample: stamping goes on from the last offset; the bound grows by
  ``DRIFT_PPM`` (0.1 ms per second) and is logged once it passes ``CLOCK_SKEW_BOUND_MS``.
* Postgres away at start-up: nothing to measure, so the process stamps with its own wall clock (the old,
  clock-trusting behaviour), says so in the log and in ``crm_clock_synchronized``, and switches to the
  shared timeline with the first sample (the hybrid clock never goes back while it does).
* A clock steps (a suspended VM, a restarted database host): the next sample contradicts the estimate; the
  old samples are dropped, the step is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable

import asyncpg

from shared.offset import DRIFT_PPM, OffsetEstimator, Sample
from shared.settings import Settings
from shared.stamps import HybridClock

log = logging.getLogger("clock")

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
ONE_MICROSECOND = dt.timedelta(microseconds=1)
CONNECT_TIMEOUT = 5.0
SAMPLES_PER_SYNC = 4  # a burst at start-up and for one-shot users (the replay tool)


class Timeline:
    def __init__(
        self,
        database_url: str,
        *,
        interval: float = 2.0,
        bound_us: int = 25_000,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.database_url = database_url
        self.interval = interval
        self.bound_us = bound_us
        self._monotonic_ns = monotonic_ns
        self._wall_ns = wall_ns
        self.estimator = OffsetEstimator()
        # Until the first sample: the local wall clock (see the module docstring).
        self._fallback_offset_ns = wall_ns() - monotonic_ns()
        self.clock = HybridClock(self.now_us)
        self.steps = 0
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned: set[str] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> Timeline:
        return cls(settings.database_url, interval=settings.clock_sync_interval,
                   bound_us=int(settings.clock_skew_bound_ms * 1000))

    # ---- reading time -------------------------------------------------------------------------------

    @property
    def synchronized(self) -> bool:
        return self.estimator.synchronized

    @property
    def database_reachable(self) -> bool:
        """The last attempt to read the database clock succeeded."""
        return self.synchronized and "unreachable" not in self._warned

    def now_us(self) -> int:
        best = self.estimator.best
        offset = best.offset_ns if best is not None else self._fallback_offset_ns
        return (self._monotonic_ns() + offset) // 1000

    def stamp(self) -> int:
        return self.clock.now()

    def error_bound_us(self) -> int | None:
        """How far a stamp issued now may be from database time (None: never measured)."""
        if not self.estimator.synchronized:
            return None
        return self.estimator.error_ns(self._monotonic_ns()) // 1000 + self.clock.lead_us()

    def wall_offset_us(self) -> int:
        """Database clock minus this machine's wall clock (what trusting the wall clock would cost)."""
        return self.now_us() - self._wall_ns() // 1000

    # ---- measuring ----------------------------------------------------------------------------------

    async def sample(self) -> Sample:
        conn = await self._connection()
        sent = self._monotonic_ns()
        server: dt.datetime = await conn.fetchval("SELECT clock_timestamp()")
        received = self._monotonic_ns()
        return Sample(sent, received, (server - EPOCH) // ONE_MICROSECOND)

    async def sync(self, samples: int = 1) -> None:
        """Take ``samples`` samples now; raises when the database cannot be reached."""
        for _ in range(samples):
            was_synchronized = self.synchronized
            try:
                step = self.estimator.add(await self.sample())
            except Exception:
                await self._close_connection()
                raise
            self._after_sample(step, was_synchronized)

    def _after_sample(self, step_ns: int | None, was_synchronized: bool) -> None:
        """Detection: log what a reader of the logs needs to know, once per change of state."""
        if not was_synchronized:
            log.info("clock synchronised with the database: local wall clock %+.1f ms off, error ±%.2f ms",
                     -self.wall_offset_us() / 1000, (self.error_bound_us() or 0) / 1000)
        if "unreachable" in self._warned:
            self._warned.discard("unreachable")
            log.info("database clock readable again")
        if step_ns is not None:
            self.steps += 1
            log.warning("clock step of %+.1f ms against the database clock (a clock jumped); re-synchronised",
                        step_ns / 1e6)
        wall_offset = self.wall_offset_us()
        self._state("wall", abs(wall_offset) > self.bound_us,
                    "local wall clock is %+.1f ms off the database clock (more than CLOCK_SKEW_BOUND_MS); "
                    "stamps follow the database clock", -wall_offset / 1000)
        bound = self.error_bound_us() or 0
        self._state("bound", bound > self.bound_us,
                    "stamps may be off the database timeline by up to %.1f ms (more than CLOCK_SKEW_BOUND_MS)",
                    bound / 1000)

    def _state(self, key: str, bad: bool, message: str, *args: object) -> None:
        if bad and key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)
        elif not bad and key in self._warned:
            self._warned.discard(key)
            log.info("clock back within CLOCK_SKEW_BOUND_MS (%s)", key)

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.database_url, timeout=CONNECT_TIMEOUT)
        return self._conn

    async def _close_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.terminate()
            self._conn = None

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Measure now (a few samples) if the database answers, then keep measuring in the background."""
        try:
            await asyncio.wait_for(self.sync(SAMPLES_PER_SYNC), timeout=CONNECT_TIMEOUT)
        except Exception as exc:
            log.warning("cannot read the database clock (%s: %s); stamping with the local wall clock until it "
                        "answers", exc.__class__.__name__, exc)
            self._warned.add("unreachable")
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close_connection()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.wait_for(self.sync(), timeout=CONNECT_TIMEOUT)
            except Exception as exc:
                if "unreachable" not in self._warned:
                    self._warned.add("unreachable")
                    log.warning("cannot read the database clock (%s: %s); stamping from the last offset "
                                "(error grows by %.1f ms per second)", exc.__class__.__name__, exc,
                                DRIFT_PPM / 1000)
                bound = self.error_bound_us()
                if bound is not None:
                    self._state("bound", bound > self.bound_us,
                                "stamps may be off the database timeline by up to %.1f ms "
                                "(more than CLOCK_SKEW_BOUND_MS)", bound / 1000)
