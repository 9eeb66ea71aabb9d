"""Request ids: UUIDv7 (RFC 9562) — unique, time-ordered, canonical 36-character form.

The time inside an id is what lets ``GET /api/external/requests/{id}`` tell "accepted, not applied yet"
(a well-formed id of our format inside the retention window) from "never heard of it" (404) without storing
anything at accept time.

Accepted or not is written in the id too, so that an id handed out with a refusal is never answered
``pending``, again without storing anything: the gateway makes every POST's id in its *unaccepted* form
(``new_unaccepted_request_id``: the 12 ``rand_a`` bits, the three hex digits after the version ``7``, are
``bad``, so the id reads ``xxxxxxxx-xxxx-7bad-...``) and turns it into its *accepted* form
(``accepted_request_id``: fresh random ``rand_a``, never ``bad``; time and the last 62 bits kept) only when
the broker has confirmed the request. An id whose ``rand_a`` is ``bad`` was therefore never accepted
(``was_refused``). A UUIDv7 made elsewhere carries ``bad`` there once in 4096 and is otherwise read exactly
as before. Pure functions; the caller passes the time (the gateway uses the shared timeline).
"""

from __future__ import annotations

import os
import random
import uuid
from typing import Final

VERSION: Final = 7
# rand_a (bits 64..75 of the 128, right after the version nibble) of an id that was not accepted.
REFUSED_MARK: Final = 0xBAD
_RAND_A_SHIFT: Final = 64
_RAND_A: Final = 0xFFF << _RAND_A_SHIFT


def _text(value: int) -> str:
    # str(uuid.UUID(int=value)) gives the same text at twice the cost (once per request).
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _fresh_rand_a() -> int:
    # Not from os.urandom: rand_a only has to differ from REFUSED_MARK; the 62 bits after the variant (from
    # os.urandom) and the millisecond make ids unique. getrandbits costs a tenth of a system call.
    rand_a = random.getrandbits(12)
    return rand_a ^ 1 if rand_a == REFUSED_MARK else rand_a  # an accepted id never reads as refused


def _new_value(now_ms: int, rand_a: int) -> int:
    """A UUIDv7 as an int: 48-bit time, version, ``rand_a``, variant, 62 random bits (os.urandom)."""
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    return ((now_ms & 0xFFFF_FFFF_FFFF) << 80 | VERSION << 76 | rand_a << _RAND_A_SHIFT
            | 0x2 << 62 | rand_b)  # 0x2: the RFC 4122/9562 variant


def new_request_id(now_ms: int) -> str:
    """An accepted-form UUIDv7 for the Unix time ``now_ms`` (ms): 48-bit time, version, 74 random bits
    (``rand_a`` never ``REFUSED_MARK``)."""
    return _text(_new_value(now_ms, _fresh_rand_a()))


def new_unaccepted_request_id(now_ms: int) -> str:
    """The id of a request not accepted (yet): a UUIDv7 for ``now_ms`` whose ``rand_a`` is ``REFUSED_MARK``."""
    return _text(_new_value(now_ms, REFUSED_MARK))


def accepted_request_id(request_id: str) -> str:
    """The accepted form of one of our ids (same time, same last 62 bits, fresh ``rand_a``): ``rand_a`` is the
    three hex digits after the version digit, ``request_id[15:18]``."""
    return f"{request_id[:15]}{_fresh_rand_a():03x}{request_id[18:]}"


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


def was_refused(request_id: str) -> bool:
    """True for a canonical UUIDv7 in its unaccepted form: handed out with a refusal, never to be applied."""
    return request_id_time_ms(request_id) is not None and request_id[15:18] == f"{REFUSED_MARK:03x}"
