"""Request ids: UUIDv7 (RFC 9562) — unique, time-ordered, canonical 36-character form.

The time inside an id is what lets ``GET /api/external/requests/{id}`` tell "accepted, not applied yet"
(a well-formed id of our format inside the retention window) from "never heard of it" (404) without storing
anything at accept time. Pure functions; the caller passes the time (the gateway uses the shared timeline).
"""

from __future__ import annotations

import os
import uuid
from typing import Final

VERSION: Final = 7


def new_request_id(now_ms: int) -> str:
    """A UUIDv7 for the Unix time ``now_ms`` (milliseconds): 48-bit time, version, 74 random bits."""
    value = (now_ms & 0xFFFF_FFFF_FFFF) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (VERSION << 76)  # version nibble
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122/9562 variant
    # str(uuid.UUID(int=value)) gives the same text at twice the cost (once per request).
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def request_id_time_ms(request_id: str) -> int | None:
    """The Unix time (ms) inside a canonical UUIDv7, or None for anything else."""
    if len(request_id) != 36:
        return None
    try:
        parsed = uuid.UUID(request_id)
    except ValueError:
        return None
    if str(parsed) != request_id or parsed.version != VERSION or parsed.variant != uuid.RFC_4122:
        return None
    return parsed.int >> 80
