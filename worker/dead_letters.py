"""Dead letters: what one is, and moving them out of the broker's dead-letter queue into PostgreSQL.

Flow: a worker gives up on a request and publishes it, with headers saying why (``worker.deadletter``), to
``<prefix>.dead`` — a quorum queue on a cluster, replicated like the shards; the broker may dead-letter a whole
pack there too (a quorum queue's delivery limit, with ``x-death``). Whoever reads dead letters (the replay tool)
first *moves* them into the ``dead_letters`` table: get one, insert it, commit, then ack it. From then on they are
read, filtered, replayed and dropped there.

Why move them: on a quorum queue every get-and-return counts as a delivery (``x-delivery-count``), and a delivery
limit — RabbitMQ 4's default of 20, or an operator's ``delivery-limit`` policy — drops a message that was merely
*listed* that often. Rows in a table can be read any number of times, by any number of operators, in a stable
order, and searched. A message whose ack is lost after the commit is moved again and stored once (its
fingerprint, sha256 of body and headers, is unique per queue).
"""

from __future__ import annotations

import argparse
import datetime as dt
import decimal
import hashlib
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from aio_pika.abc import AbstractChannel

from shared.logs import mask_payload, mask_text
from shared.topology import Topology
from worker.deadletter import (
    H_ATTEMPTS,
    H_DEAD_AT,
    H_ERROR,
    H_EXCEPTION,
    H_FIRST_FAILURE,
    H_LAST_FAILURE,
    H_REPLAYED,
    H_REQUEST_ID,
    H_ROUTING_KEY,
    H_USER_ID,
)
from worker.repository import delete_dead_letters, insert_dead_letter, select_dead_letters


@dataclass(eq=False)
class DeadLetter:
    """One message of the dead-letter queue: usually one request dead-lettered by a worker, or a whole pack
    dead-lettered by the broker itself (a quorum queue's delivery limit, see ``shared.topology``)."""

    row_id: int
    envelopes: list[dict[str, Any]]
    headers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, row_id: int, body: bytes, headers: dict[str, Any]) -> DeadLetter:
        try:
            decoded = orjson.loads(body)
        except orjson.JSONDecodeError:
            decoded = None
        envelopes: list[dict[str, Any]] = []
        if isinstance(decoded, dict) and "request_id" in decoded:
            envelopes = [decoded]
        elif isinstance(decoded, dict) and isinstance(decoded.get("requests"), list):
            envelopes = [r for r in decoded["requests"] if isinstance(r, dict) and "request_id" in r]
        return cls(row_id, envelopes, headers)

    @property
    def envelope(self) -> dict[str, Any] | None:
        return self.envelopes[0] if self.envelopes else None

    @property
    def request_ids(self) -> list[str]:
        return [str(e.get("request_id")) for e in self.envelopes]

    @property
    def request_id(self) -> str | None:
        value = (self.envelope or {}).get("request_id") or self.headers.get(H_REQUEST_ID)
        return str(value) if value is not None else None

    @property
    def user_id(self) -> str | None:
        value = (self.envelope or {}).get("user_id") or self.headers.get(H_USER_ID)
        return str(value) if value is not None else None

    @property
    def _x_death(self) -> dict[str, Any]:
        deaths = self.headers.get("x-death")
        return deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}

    @property
    def reason(self) -> str:
        if H_ERROR in self.headers:
            return str(self.headers[H_ERROR])
        if self._x_death:
            return f"dead-lettered by the broker: {self._x_death.get('reason', 'unknown')}"
        return ""

    @property
    def routing_key(self) -> str | None:
        value = self.headers.get(H_ROUTING_KEY)
        if value is None:
            keys = self._x_death.get("routing-keys")
            value = keys[0] if isinstance(keys, list) and keys else None
        return str(value) if value is not None else None

    def matches(self, args: argparse.Namespace) -> bool:
        user_id = getattr(args, "user_id", None)
        if user_id is not None and user_id not in {str(e.get("user_id")) for e in self.envelopes} | {
            self.user_id
        }:
            return False
        request_id = getattr(args, "request_id", None)
        if request_id is not None and request_id not in [*self.request_ids, self.request_id]:
            return False
        if getattr(args, "reason", None) is not None:
            needle = args.reason.lower()
            haystack = f"{self.reason} {self.headers.get(H_EXCEPTION, '')}".lower()
            if needle not in haystack:
                return False
        return True

    def summary(self, show_pii: bool) -> dict[str, Any]:
        payload = (self.envelope or {}).get("payload")
        if isinstance(payload, dict) and not show_pii:
            payload = mask_payload(payload)  # phones, WeChat id and name
        reason = self.reason if show_pii else mask_text(self.reason)  # database errors may quote values
        return {
            "requestId": self.request_id,
            "userId": self.user_id,
            "reason": reason,
            "exception": self.headers.get(H_EXCEPTION) if show_pii else mask_text(
                str(self.headers.get(H_EXCEPTION) or "")) or None,
            "attempts": self.headers.get(H_ATTEMPTS),
            "firstFailureAt": self.headers.get(H_FIRST_FAILURE),
            "lastFailureAt": self.headers.get(H_LAST_FAILURE),
            "deadAt": self.headers.get(H_DEAD_AT),
            "routingKey": self.routing_key,
            "replayed": bool((self.envelope or {}).get("replayed") or self.headers.get(H_REPLAYED)),
            "payload": payload if self.envelope is not None else None,
            **({"requestIds": self.request_ids} if len(self.envelopes) > 1 else {}),
        }


def plain_headers(value: Any) -> Any:
    """AMQP header values as JSON-ready values (bytes as text, timestamps as ISO strings)."""
    if isinstance(value, dict):
        return {str(key): plain_headers(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain_headers(item) for item in value]
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    return value


def fingerprint(body: bytes, headers: dict[str, Any]) -> str:
    return hashlib.sha256(body + b"\0" + orjson.dumps(headers, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def move_from_queue(channel: AbstractChannel, conn: asyncpg.Connection, topology: Topology) -> int:
    """Move every message of the dead-letter queue into ``dead_letters``; return how many were moved.

    Each message is acked only after its row is committed: a crash in between leaves it in the queue, and the
    next move stores it once (ON CONFLICT on its fingerprint).
    """
    queue = await topology.declare_dead_letter_queue(channel)
    moved = 0
    while (message := await queue.get(no_ack=False, fail=False)) is not None:
        # x-delivery-count belongs to this one delivery (a quorum queue adds it), not to the dead letter.
        headers = plain_headers({k: v for k, v in (message.headers or {}).items() if k != "x-delivery-count"})
        letter = DeadLetter.read(0, message.body, headers)
        await insert_dead_letter(
            conn, queue=topology.dead_letter_queue, fingerprint=fingerprint(message.body, headers),
            request_id=letter.request_id, user_id=letter.user_id, reason=letter.reason, headers=headers,
            body=message.body)
        await message.ack()
        moved += 1
    return moved


async def stored(conn: asyncpg.Connection, topology: Topology) -> list[DeadLetter]:
    """Every dead letter of this deployment's queue, in the order they were dead-lettered."""
    rows = await select_dead_letters(conn, topology.dead_letter_queue)
    return [DeadLetter.read(row["id"], row["body"], row["headers"]) for row in rows]


async def forget(conn: asyncpg.Connection, letters: list[DeadLetter]) -> None:
    """Delete replayed or dropped dead letters."""
    await delete_dead_letters(conn, [letter.row_id for letter in letters])
