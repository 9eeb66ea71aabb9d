"""The versioned message formats that travel over RabbitMQ (JSON via orjson; never pickle).

gateway -> worker   a *pack*: ``{"v": 1, "requests": [RequestEnvelope, ...]}`` — several requests of one
                    shard in one AMQP message (batching is what makes the queue cheap).
worker -> gateway   a *reply*: ``{"v": 1, "outcomes": [Outcome, ...]}`` on the gateway's reply queue.
worker -> dead      a single RequestEnvelope per dead letter, so each can be listed and replayed alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from shared.errors import PermanentError
from shared.model import CustomerIn

SCHEMA_VERSION: Final = 1

# "superseded": the customer exists and every field the request provided had already been written by a newer
# request (a stale replay, or a genuinely concurrent write), so nothing changed.
OutcomeStatus = Literal["created", "updated", "superseded", "phone_taken", "idempotency_conflict", "failed"]


class RequestEnvelope(BaseModel):
    """One accepted request: who, when (stamp), and the validated payload in wire names."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = SCHEMA_VERSION
    request_id: str
    stamp: int
    user_id: str
    payload: dict[str, Any]
    idempotency_key: str | None = None
    body_hash: str | None = None
    replayed: bool = False
    # The NAME of the API key the request came with (None with keys off); stored with the processed record.
    api_key: str | None = None

    def customer(self) -> CustomerIn:
        """Re-validate the payload with the shared model; a mismatch is a permanent error."""
        try:
            customer = CustomerIn.model_validate(self.payload)
        except ValidationError as exc:
            raise PermanentError(f"payload fails the request schema: {exc.error_count()} error(s)") from exc
        if customer.user_id != self.user_id:
            raise PermanentError("payload userId differs from the envelope userId")
        return customer

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


@dataclass(slots=True)
class Outcome:
    """What happened to one request; ``id`` is the customer id when there is one.

    A plain dataclass, not a pydantic model: outcomes are built by the worker and read by the gateway, both
    ours, hundreds per reply; validating them again would only cost time.
    """

    request_id: str
    user_id: str
    status: OutcomeStatus
    id: int | None = None
    error: str | None = None
    # Wire names of provided fields that lost to newer writes (all of them when status is "superseded").
    superseded: list[str] | None = None


def body_hash(wire_payload: dict[str, Any]) -> str:
    """Fingerprint of a normalised request body, for Idempotency-Key comparison."""
    return hashlib.sha256(orjson.dumps(wire_payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


def encode_pack(requests: list[RequestEnvelope]) -> bytes:
    # Every field of RequestEnvelope is JSON-native, so the instance dict is its JSON form.
    return orjson.dumps({"v": SCHEMA_VERSION, "requests": [r.__dict__ for r in requests]})


def decode_pack(body: bytes) -> list[dict[str, Any]]:
    """Split a pack into raw request dicts; a body that is not a v1 pack is a permanent error.

    Requests are validated one by one afterwards (``RequestEnvelope.model_validate``) so one bad request
    does not take its neighbours down with it.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PermanentError(f"message body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PermanentError("message body is not a JSON object")
    if data.get("v") != SCHEMA_VERSION:
        raise PermanentError(f"unsupported schema version {data.get('v')!r}")
    requests = data.get("requests")
    if isinstance(requests, list) and all(isinstance(r, dict) for r in requests):
        return requests
    if "request_id" in data:  # a single dead-lettered or replayed envelope
        return [data]
    raise PermanentError("message body has no requests list")


def encode_reply(outcomes: list[Outcome]) -> bytes:
    return orjson.dumps({"v": SCHEMA_VERSION, "outcomes": outcomes})  # orjson serialises dataclasses


def decode_reply(body: bytes) -> list[Outcome]:
    """Outcomes from a worker's reply (built by ``encode_reply``)."""
    data = orjson.loads(body)
    # Only known keys: a newer worker may add some, and a reply must still be read during a rolling upgrade.
    return [Outcome(**{k: v for k, v in outcome.items() if k in _OUTCOME_KEYS}) for outcome in data.get("outcomes", [])]


_OUTCOME_KEYS: Final = frozenset(Outcome.__dataclass_fields__)
