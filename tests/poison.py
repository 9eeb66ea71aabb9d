"""A poison request on demand: a trigger on customers that refuses chosen userIds (dead-letter tests)."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import asyncpg

MAX_ATTEMPTS = 3
# Stacks that dead-letter within a second: few attempts, short backoff.
FAST_RETRIES: dict[str, Any] = {"MAX_ATTEMPTS": MAX_ATTEMPTS, "RETRY_BASE_DELAY": 0.2, "RETRY_MAX_DELAY": 1}


class PoisonTrigger:
    """``BEFORE INSERT OR UPDATE`` trigger on customers raising for userIds that start with ``marker``."""

    # The statement raising for a refused row (subclasses may quote more of the row, as database errors do).
    RAISE = "RAISE EXCEPTION 'test trigger refuses %', NEW.user_id;"

    def __init__(self, db: asyncpg.Pool) -> None:
        self.db = db
        self.marker = f"poison{uuid.uuid4().hex[:12]}"
        self._users = itertools.count(1)
        self.active = False

    def user(self) -> str:
        return f"{self.marker}_{next(self._users)}"

    async def create(self) -> None:
        await self.db.execute(f"""
            CREATE FUNCTION {self.marker}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.user_id LIKE '{self.marker}%' THEN
                    {self.RAISE}
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER {self.marker} BEFORE INSERT OR UPDATE ON customers
                FOR EACH ROW EXECUTE FUNCTION {self.marker}();
        """)
        self.active = True

    async def drop(self) -> None:
        """The cause is fixed: the same requests now succeed."""
        await self.db.execute(f"""
            DROP TRIGGER IF EXISTS {self.marker} ON customers;
            DROP FUNCTION IF EXISTS {self.marker}();
        """)
        self.active = False
