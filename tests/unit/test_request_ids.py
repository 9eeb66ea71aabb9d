"""Request ids (``gateway.request_ids``): canonical UUIDv7 carrying the time they were made and whether they were
accepted, and the parser that tells our ids from anything else."""

from __future__ import annotations

import re
import uuid

import pytest

from gateway.request_ids import (
    accepted_request_id,
    new_request_id,
    new_unaccepted_request_id,
    request_id_time_ms,
    was_refused,
)

CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
NOW_MS = 1_767_225_600_123  # 2026-01-01T00:00:00.123Z


def test_new_request_id_is_a_canonical_36_character_uuidv7() -> None:
    request_id = new_request_id(NOW_MS)

    assert len(request_id) == 36
    assert CANONICAL.fullmatch(request_id), request_id
    parsed = uuid.UUID(request_id)
    assert str(parsed) == request_id
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122


def test_new_request_id_carries_the_given_millisecond_time() -> None:
    for now_ms in (0, 1, NOW_MS, 2**48 - 1):
        request_id = new_request_id(now_ms)
        assert uuid.UUID(request_id).int >> 80 == now_ms
        assert request_id_time_ms(request_id) == now_ms


def test_new_request_ids_are_unique_within_one_millisecond() -> None:
    ids = [new_request_id(NOW_MS) for _ in range(10_000)]

    assert len(set(ids)) == len(ids)


def test_new_request_ids_sort_in_time_order_across_milliseconds() -> None:
    times = [NOW_MS + step for step in (0, 1, 2, 10, 999, 1000, 86_400_000)]
    # Within one millisecond the order is random; across milliseconds string order is time order.
    ids = [new_request_id(now_ms) for now_ms in times for _ in range(20)]

    by_string = sorted(ids)
    assert [request_id_time_ms(request_id) for request_id in by_string] == sorted(
        now_ms for now_ms in times for _ in range(20)
    )
    one_per_millisecond = [new_request_id(now_ms) for now_ms in times]
    assert sorted(one_per_millisecond) == one_per_millisecond


def test_request_id_time_ms_reads_a_foreign_but_valid_uuidv7() -> None:
    # Built by hand, not by new_request_id: the parser must follow RFC 9562, not our generator.
    value = NOW_MS << 80 | 0x7 << 76 | 0x123 << 64 | 0b10 << 62 | 0x0123_4567_89AB_CDEF
    request_id = str(uuid.UUID(int=value))

    assert request_id_time_ms(request_id) == NOW_MS


@pytest.mark.parametrize(
    "text",
    [
        str(uuid.uuid4()),  # version 4
        str(uuid.uuid1()),  # version 1
        "00000000-0000-0000-0000-000000000000",
        new_request_id(NOW_MS).upper(),  # not the canonical (lowercase) form
        "{" + new_request_id(NOW_MS) + "}",  # braced
        new_request_id(NOW_MS).replace("-", ""),  # 32 hex digits
        "urn:uuid:" + new_request_id(NOW_MS),
        new_request_id(NOW_MS)[:-1],  # truncated
        new_request_id(NOW_MS)[:-1] + "g",  # not hex
        new_request_id(NOW_MS)[:19] + "c" + new_request_id(NOW_MS)[20:],  # variant 0b11 (reserved)
        new_request_id(NOW_MS)[:19] + "7" + new_request_id(NOW_MS)[20:],  # variant 0b0 (NCS)
        "",
        "not-a-request-id",
        "x" * 36,
        "12345678-1234-7234-8234-1234567890a\u0661",  # a non-ASCII digit
    ],
    ids=[
        "v4", "v1", "nil", "uppercase", "braced", "32-hex", "urn", "truncated", "non-hex", "reserved-variant",
        "ncs-variant", "empty", "garbage", "36-x", "arabic-digit",
    ],
)
def test_request_id_time_ms_is_none_for_anything_but_a_canonical_uuidv7(text: str) -> None:
    assert request_id_time_ms(text) is None


# ---- accepted or not, written in the id (issue 13) ------------------------------------------------------


def test_an_unaccepted_id_is_a_canonical_uuidv7_reading_7bad_and_is_known_as_refused() -> None:
    request_id = new_unaccepted_request_id(NOW_MS)
    assert CANONICAL.fullmatch(request_id), request_id
    assert request_id[14:18] == "7bad"
    assert request_id_time_ms(request_id) == NOW_MS
    assert was_refused(request_id)


def test_the_accepted_form_keeps_time_and_last_62_bits_and_is_not_refused() -> None:
    for _ in range(2_000):  # rand_a is redrawn: it must never come out as the mark
        unaccepted = new_unaccepted_request_id(NOW_MS)
        accepted = accepted_request_id(unaccepted)
        assert CANONICAL.fullmatch(accepted), accepted
        assert not was_refused(accepted), accepted
        assert request_id_time_ms(accepted) == NOW_MS
        assert (accepted[:14], accepted[19:]) == (unaccepted[:14], unaccepted[19:])


def test_new_request_ids_are_never_in_the_refused_form() -> None:
    assert not any(was_refused(new_request_id(NOW_MS)) for _ in range(20_000))


def test_unaccepted_ids_are_unique_within_one_millisecond() -> None:
    ids = [new_unaccepted_request_id(NOW_MS) for _ in range(10_000)]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(("rand_a", "refused"), [(0xBAD, True), (0xBAC, False), (0x000, False), (0xFFF, False)])
def test_a_foreign_uuidv7_is_taken_as_refused_only_with_rand_a_bad(rand_a: int, refused: bool) -> None:
    value = NOW_MS << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | 0x0123_4567_89AB_CDEF
    assert was_refused(str(uuid.UUID(int=value))) is refused


def test_only_a_canonical_uuidv7_is_taken_as_refused() -> None:
    request_id = new_unaccepted_request_id(NOW_MS)
    assert not any(was_refused(text) for text in (request_id.upper(), request_id[:-1], "x" * 14 + "7bad"))
