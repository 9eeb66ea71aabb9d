"""The console's one way to the dead letters: what the pages and the JSON API both call.

Everything here is ``worker.dead_letters`` — the same selection, dry run, replay, drop and audit as the replay
tool's — over the console's long-lived connections: an asyncpg pool (the replay role) and one AMQP channel with
publisher confirms (the replay user). Before answering with dead letters the desk moves whatever waits in the
broker's dead-letter queue into PostgreSQL (``refresh``): browsing then reads only the table, so it changes no
queue order, no delivery count, and nothing another operator sees.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiohttp import web

from shared.clock.stamps import HybridClock
from shared.settings import CONNECT_TIMEOUT, Settings
from shared.topology import Topology
from worker import dead_letters
from worker.dead_letters import DeadLetter, LetterFilter, Report, RequestPlan, RequestStatus

PAGE_SIZE: Final = 50
PREVIEW_SIZE: Final = 20  # dead letters shown (with their plan) by a dry run


class BadQuery(ValueError):
    """A filter, page or action the console cannot run; the message says which and why."""


class Changed(Exception):
    """The dead letters matching a confirmed action are not the ones confirmed (another operator acted)."""

    def __init__(self, confirmed: int, now: int) -> None:
        super().__init__(f"{confirmed} dead letters were confirmed but {now} match now: review the dry run again")
        self.confirmed, self.now = confirmed, now


# ---- filters -------------------------------------------------------------------------------------------

FILTER_FIELDS: Final = ("userId", "requestId", "reason", "since", "until", "q")


def _time(name: str, text: str) -> dt.datetime:
    """A date (``2024-05-01``) or an ISO time (``2024-05-01T08:30``, what a datetime-local input sends); without
    a zone it is UTC."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise BadQuery(f"{name} must be a date or an ISO 8601 time, like 2024-05-01 or 2024-05-01T08:30") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def parse_filter(query: Mapping[str, Any]) -> LetterFilter:
    """The filter of a query string or a JSON body (``userId``, ``requestId``, ``reason``, ``since``, ``until``,
    ``q``); empty values are absent."""
    values: dict[str, str] = {}
    for name in FILTER_FIELDS:
        value = query.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if not isinstance(value, str):
            raise BadQuery(f"{name} must be a string")
        values[name] = value.strip()
    return LetterFilter(
        user_id=values.get("userId"), request_id=values.get("requestId"), reason=values.get("reason"),
        since=_time("since", values["since"]) if "since" in values else None,
        until=_time("until", values["until"]) if "until" in values else None, q=values.get("q"))


def parse_page(text: str | None) -> int:
    try:
        page = int(text or 1)
    except ValueError:
        raise BadQuery("page must be a whole number") from None
    if page < 1:
        raise BadQuery("page must be 1 or more")
    return page


# ---- answers -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LetterPage:
    total: int
    page: int
    letters: list[DeadLetter]

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // PAGE_SIZE))


@dataclass(frozen=True)
class DryRun:
    """How many dead letters an action would take, the first ``PREVIEW_SIZE`` and, per request, its plan."""

    total: int
    first: list[DeadLetter]
    plans: dict[str, RequestPlan]
    force: bool


class Desk:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, connection: AbstractConnection,
                 channel: AbstractChannel) -> None:
        self.settings = settings
        self.pool = pool
        self.connection = connection  # moves open a channel of their own (dead_letters.move_from_queue)
        self.channel = channel  # replays publish on this one (publisher confirms, returns raise)
        self.topology = Topology.from_settings(settings)
        # One move, replay or drop at a time: they share the channel, and a replay must not race a drop.
        self.lock = asyncio.Lock()

    async def refresh(self) -> int:
        """Move what waits in the dead-letter queue into PostgreSQL; return how many were moved."""
        async with self.lock, self.pool.acquire() as conn:
            return await dead_letters.move_from_queue(self._connected, conn, self.topology)

    async def _connected(self) -> AbstractConnection:
        """The robust connection once it is (re)connected: it reconnects by itself after the broker closed it."""
        await asyncio.wait_for(self.connection.ready(), timeout=CONNECT_TIMEOUT)
        return self.connection

    async def browse(self, letter_filter: LetterFilter, page: int) -> LetterPage:
        """A page of matching dead letters, newest first, with how many match in all."""
        await self.refresh()
        async with self.pool.acquire() as conn:
            total = await dead_letters.count(conn, self.topology, letter_filter)
            letters = await dead_letters.stored(conn, self.topology, letter_filter, newest_first=True,
                                                limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        return LetterPage(total, page, letters)

    async def letter(self, row_id: int) -> DeadLetter | None:
        async with self.pool.acquire() as conn:
            return await dead_letters.one(conn, self.topology, row_id)

    async def same_request(self, letter: DeadLetter) -> list[DeadLetter]:
        """Other dead letters of the same request (it died again after a replay), newest first."""
        if letter.request_id is None:
            return []
        async with self.pool.acquire() as conn:
            found = await dead_letters.stored(conn, self.topology, LetterFilter(request_id=letter.request_id),
                                              newest_first=True, limit=PAGE_SIZE)
        return [other for other in found if other.row_id != letter.row_id]

    async def _chosen(self, conn: asyncpg.Connection, letter_filter: LetterFilter | None,
                      ids: Sequence[int] | None) -> list[DeadLetter]:
        if ids is not None:
            letters = [await dead_letters.one(conn, self.topology, row_id) for row_id in ids]
            return [letter for letter in letters if letter is not None]
        return await dead_letters.stored(conn, self.topology, letter_filter)

    async def dry_run(self, letter_filter: LetterFilter | None, *, force: bool,
                      ids: Sequence[int] | None = None) -> DryRun:
        """What replaying (or dropping) the matching dead letters would do; changes nothing."""
        await self.refresh()
        async with self.pool.acquire() as conn:
            if ids is not None:
                first = await self._chosen(conn, None, ids)
                total = len(first)
            else:
                total = await dead_letters.count(conn, self.topology, letter_filter)
                first = await dead_letters.stored(conn, self.topology, letter_filter, limit=PREVIEW_SIZE)
            plans = await dead_letters.plan(conn, first[:PREVIEW_SIZE], force=force)
        return DryRun(total, first[:PREVIEW_SIZE], plans, force)

    async def replay(self, letter_filter: LetterFilter | None, *, actor: str, force: bool,
                     ids: Sequence[int] | None = None, confirmed: int | None = None) -> Report:
        """Replay the matching dead letters (stale-safe unless ``force``); one audit row.

        ``confirmed``: the count the operator confirmed; if another number matches now, nothing is done
        (``Changed``).
        """
        await self.refresh()
        async with self.lock, self.pool.acquire() as conn:
            letters = await self._chosen(conn, letter_filter, ids)
            if confirmed is not None and confirmed != len(letters):
                raise Changed(confirmed, len(letters))
            clock = await dead_letters.fresh_stamp_clock(self.settings, conn) if force else HybridClock()
            return await dead_letters.replay(
                self.channel, conn, self.topology, letters, force=force, clock=clock, actor=actor,
                filters=_audited(letter_filter, ids, force=force))

    async def drop(self, letter_filter: LetterFilter | None, *, actor: str, why: str,
                   ids: Sequence[int] | None = None, confirmed: int | None = None) -> Report:
        """Discard the matching dead letters for good; ``why`` goes into the audit row."""
        if not why.strip():
            raise BadQuery("a reason is required to drop dead letters")
        await self.refresh()
        async with self.lock, self.pool.acquire() as conn:
            letters = await self._chosen(conn, letter_filter, ids)
            if confirmed is not None and confirmed != len(letters):
                raise Changed(confirmed, len(letters))
            return await dead_letters.drop(conn, letters, actor=actor, filters=_audited(letter_filter, ids),
                                           why=why.strip())

    async def reveal(self, letter: DeadLetter, *, actor: str) -> int:
        async with self.pool.acquire() as conn:
            return await dead_letters.reveal(conn, letter, actor=actor)

    async def statuses(self, request_ids: Sequence[str]) -> dict[str, RequestStatus]:
        async with self.pool.acquire() as conn:
            return await dead_letters.request_statuses(conn, request_ids)

    async def audit(self, page: int) -> tuple[int, list[dict[str, Any]]]:
        async with self.pool.acquire() as conn:
            total = await dead_letters.audit_count(conn)
            rows = await dead_letters.audit_rows(conn, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        return total, rows

    async def audit_row(self, audit_id: int) -> dict[str, Any] | None:
        async with self.pool.acquire() as conn:
            rows = await dead_letters.audit_rows(conn, audit_id=audit_id)
        return rows[0] if rows else None


def _audited(letter_filter: LetterFilter | None, ids: Sequence[int] | None, *, force: bool = False,
             ) -> dict[str, Any]:
    """What the audit row records as the selection: the ids chosen, or the filter (``all`` when empty)."""
    selection: dict[str, Any] = {"ids": list(ids)} if ids is not None else (
        (letter_filter.given() if letter_filter else {}) or {"all": True})
    return {**selection, **({"force": True} if force else {}), "via": "console"}


DESK: Final = web.AppKey("desk", Desk)
