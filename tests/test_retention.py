"""Processed request ids are kept for the retention period, then forgotten (in chunks)."""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg
import pytest

import worker.repository as repository
from tests.support import unique_user


async def test_processed_requests_older_than_retention_are_deleted_and_newer_kept(
    db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = unique_user("retention")
    old = [uuid.uuid4().hex for _ in range(5)]
    fresh = [uuid.uuid4().hex for _ in range(2)]
    await db.executemany(
        "INSERT INTO processed_requests (request_id, user_id, outcome, processed_at)"
        " VALUES ($1, $2, 'created', now() - $3::interval)",
        [(r, user, dt.timedelta(hours=49)) for r in old] + [(r, user, dt.timedelta(hours=1)) for r in fresh],
    )
    monkeypatch.setattr(repository, "CLEANUP_CHUNK", 2)  # several chunks for five rows
    async with db.acquire() as conn:
        deleted = await repository.delete_expired_processed(conn, dt.timedelta(hours=48))
    assert deleted >= len(old)  # other tests' rows are all fresh; nothing else is that old
    left = await db.fetch("SELECT request_id FROM processed_requests WHERE user_id = $1", user)
    assert sorted(r["request_id"] for r in left) == sorted(fresh)
