"""Pure merge logic: how one request changes one customer's state. No I/O; unit-tested directly.

Rules (spec + per-field stamps):
* a field the request did not provide (missing, null, "") never changes the stored value (COALESCE);
* a provided field wins only when the request's stamp is newer than that field's stamp, so applying a
  userId's requests in any order gives the row that applying them in gateway order gives;
* the spec's defaults fill a customer only when it is created, with stamp 0 (any real value is newer);
* a provided field that loses to a newer stamp is reported back (``superseded``), never silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from shared.model import CREATE_DEFAULTS

# Every stored column a request can set, in table order, with its SQL type: the worker's SQL names its columns
# from here (worker/repository.py). user_id is the key, not a field.
FIELD_TYPES: Final[Mapping[str, str]] = {
    "bot_id": "text", "nickname": "text", "name": "text", "phone": "text", "backup_phone": "text", "wechat": "text",
    "status": "smallint", "community": "text", "business_type": "text", "room_type": "text", "room_tags": "jsonb",
    "move_in_date": "date", "lease_period": "integer", "price_range": "text", "source_channel": "text",
    "creator": "text", "internal_notes": "text",
}
FIELDS: tuple[str, ...] = tuple(FIELD_TYPES)


@dataclass
class CustomerState:
    """One customer as the batch sees it: stored values plus per-field write stamps."""

    user_id: str
    values: dict[str, Any]
    stamps: dict[str, int] = field(default_factory=dict)
    id: int | None = None
    dirty: bool = False

    @classmethod
    def new(cls, user_id: str) -> CustomerState:
        values: dict[str, Any] = dict.fromkeys(FIELDS)
        values.update(CREATE_DEFAULTS)
        return cls(user_id=user_id, values=values, dirty=True)  # a new customer is written even if bare

    def apply(self, fields: dict[str, Any], stamp: int) -> list[str]:
        """Merge provided ``fields`` written at ``stamp`` (last-writer-wins per field).

        Returns the provided fields that lost to a newer stamp (a stale or concurrent write): the answer
        reports them, so it never claims an update that did not happen.
        """
        superseded = []
        for name, value in fields.items():
            if value is None:
                continue
            if stamp > self.stamps.get(name, 0):
                self.values[name] = value
                self.stamps[name] = stamp
                self.dirty = True
            else:
                superseded.append(name)
        if not superseded:
            self.dirty = True  # an update that provides nothing still counts as one (updated_at moves)
        return superseded

    def would_set(self, name: str, value: Any, stamp: int) -> bool:
        return value is not None and stamp > self.stamps.get(name, 0)
