"""One timeline for every process: the database server's clock, as seen through a measured offset.

Write stamps must order a user's requests causally across any number of gateways, whatever their wall clocks
say. So no process stamps with its own wall clock: each measures the offset between its monotonic clock and
Postgres' ``clock_timestamp()`` every ``CLOCK_SYNC_INTERVAL`` seconds (``shared.clock.offset``: NTP-style, corrected
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
* The database *server* changes (a failover to a standby, a restore, a migration to another host) and its clock
  differs from the old one's: the timeline must not step back, or a causally later write would stamp below one
  already stored and lose to it. Each server gets a shift (table ``clock_epochs``): timeline = its clock +
  shift. The first worker to see a new server decides the shift (``shared.clock.offset.shift_for_new_server``): the
  step it measured, cancelled (continuity), and never less than what keeps the timeline above the highest
  stamp stored (``clock_high_water``, raised by every batch in its own transaction). Every process adopts the
  stored shift, so they all stay on one timeline; the change is logged and counted (``crm_clock_steps_total``).
  Every sample also reads the high-water mark, and the hybrid clock never issues a stamp at or below it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable

import asyncpg

from shared.clock.offset import DRIFT_PPM, OffsetEstimator, Sample, shift_for_new_server
from shared.clock.stamps import HybridClock
from shared.settings import CONNECT_TIMEOUT, Settings

log = logging.getLogger("clock")

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
ONE_MICROSECOND = dt.timedelta(microseconds=1)
SAMPLES_PER_SYNC = 4  # a burst at start-up and for one-shot users (the replay tool)

# One round trip: the server's clock, which server this is, the shift the processes agreed for it (NULL: none
# yet) and the highest stamp stored. The server's identity changes with every new postmaster (a promoted
# standby is another postmaster than the primary it replaces, whose system identifier it shares).
SAMPLE_CLOCK = """
SELECT clock_timestamp() AS now, s.server, e.shift_us, (SELECT max(stamp) FROM clock_high_water) AS high_water
FROM (SELECT pg_postmaster_start_time()::text || ' ' || coalesce(host(inet_server_addr()), 'socket') || ':'
             || coalesce(inet_server_port()::text, '') AS server) AS s
LEFT JOIN clock_epochs AS e ON e.server = s.server
"""
# A database migrated before clock_epochs existed (or a role without its grants): the clock alone.
SAMPLE_CLOCK_ONLY = "SELECT clock_timestamp() AS now, '' AS server, 0::bigint AS shift_us, 0::bigint AS high_water"
INSERT_EPOCH = """
INSERT INTO clock_epochs (server, shift_us, decided_by) VALUES ($1, $2, $3) ON CONFLICT (server) DO NOTHING
"""
SELECT_EPOCH = "SELECT shift_us FROM clock_epochs WHERE server = $1"


class Timeline:
    def __init__(
        self,
        database_url: str,
        *,
        interval: float = 2.0,
        bound_us: int = 25_000,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        wall_ns: Callable[[], int] = time.time_ns,
        decides_shift: bool = False,
    ) -> None:
        self.database_url = database_url
        # Only workers write the shift of a new server (least privilege: gateways and the replay tool read).
        self.decides_shift = decides_shift
        self.server: str | None = None
        self.shift_us = 0
        self.server_steps = 0  # changes of database server that moved the timeline (crm_clock_steps_total)
        self._sample_query = SAMPLE_CLOCK
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
    def from_settings(cls, settings: Settings, *, decides_shift: bool = False) -> Timeline:
        return cls(settings.database_url, interval=settings.clock_sync_interval,
                   bound_us=int(settings.clock_skew_bound_ms * 1000), decides_shift=decides_shift)

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
        """One reading of the database clock, on the shared timeline (the server's shift added)."""
        conn = await self._connection()
        sent = self._monotonic_ns()
        try:
            row = await conn.fetchrow(self._sample_query)
        except (asyncpg.UndefinedTableError, asyncpg.InsufficientPrivilegeError) as exc:
            log.warning("cannot read the shared timeline's shift and high-water mark (%s); sampling the database "
                        "clock alone: run `python -m shared.migrate` (and --create-roles)", exc)
            self._sample_query = SAMPLE_CLOCK_ONLY
            sent = self._monotonic_ns()
            row = await conn.fetchrow(self._sample_query)
        received = self._monotonic_ns()
        server_us = (row["now"] - EPOCH) // ONE_MICROSECOND
        if row["server"] != self.server:
            shift = row["shift_us"]
            if shift is None:
                shift = await self._decide_shift(conn, row["server"], server_us, (sent + received) // 2,
                                                 int(row["high_water"] or 0))
            self._change_server(row["server"], int(shift), server_us)
        elif row["shift_us"] is not None and row["shift_us"] != self.shift_us:
            self._change_server(row["server"], int(row["shift_us"]), server_us)  # another process decided
        self.clock.observe(int(row["high_water"] or 0))
        return Sample(sent, received, server_us + self.shift_us)

    async def _decide_shift(self, conn: asyncpg.Connection, server: str, server_us: int, at_ns: int,
                            high_water: int) -> int:
        """The shift of a server no process has recorded yet: decided here, stored if this process may."""
        best = self.estimator.best
        timeline_us = (at_ns + best.offset_ns) // 1000 if best is not None and self.server is not None else None
        shift, reason = shift_for_new_server(server_us, timeline_us, high_water)
        if not self.decides_shift:
            return shift  # a worker will store one; adopted at a later sample
        try:
            await conn.execute(INSERT_EPOCH, server, shift, reason)
            stored: int = await conn.fetchval(SELECT_EPOCH, server)  # ours, or the first process's
            return stored
        except asyncpg.PostgresError as exc:  # a standby (read-only), or a role without the grant
            log.info("cannot record the timeline's shift for %s (%s); using %+.1f ms until one is recorded",
                     server, exc, shift / 1000)
            return shift

    def _change_server(self, server: str, shift_us: int, server_us: int) -> None:
        previous, old_shift = self.server, self.shift_us
        self.server, self.shift_us = server, shift_us
        if previous is None:
            if shift_us:
                log.info("database clock runs %.1f ms behind the shared timeline (server %s): stamping on the "
                         "timeline", shift_us / 1000, server)
            return
        if previous == server:
            log.info("adopting the recorded shift of the shared timeline for %s: %+.1f ms (was %+.1f ms)", server,
                     shift_us / 1000, old_shift / 1000)
            return
        if shift_us != old_shift:
            self.server_steps += 1
        log.warning("database server changed (%s -> %s); its clock reads %+.1f ms against the shared timeline, "
                    "which goes on at a shift of %+.1f ms (was %+.1f ms)", previous, server,
                    (server_us - self.now_us()) / 1000, shift_us / 1000, old_shift / 1000)

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
