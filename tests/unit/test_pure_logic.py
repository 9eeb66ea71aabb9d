"""Pure logic without I/O: the hybrid clock, the per-field merge, the retry policy,
the transient-error classification and the message envelope."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import orjson
import pytest

from shared.clock.stamps import HybridClock
from shared.envelope import (
    SCHEMA_VERSION,
    Outcome,
    RequestEnvelope,
    body_hash,
    decode_pack,
    decode_reply,
    encode_pack,
    encode_reply,
)
from shared.errors import PermanentError, RetryableError, is_transient
from shared.model import CREATE_DEFAULTS
from worker.consumer import backoff
from worker.merge import FIELDS, CustomerState

# ---- HybridClock ------------------------------------------------------------------------------------


def readings(values_us: list[int]) -> Callable[[], int]:
    it: Iterator[int] = iter(values_us)
    return lambda: next(it)


def test_clock_follows_its_physical_time_in_microseconds() -> None:
    clock = HybridClock(readings([1_000_000, 1_000_005, 2_000_000]))
    assert [clock.now(), clock.now(), clock.now()] == [1_000_000, 1_000_005, 2_000_000]


def test_clock_is_strictly_monotonic_when_physical_time_stalls_or_goes_back() -> None:
    values = [5_000, 5_000, 5_000, 4_000, 1, 5_002, 9_000]
    clock = HybridClock(readings(values))
    stamps = [clock.now() for _ in values]
    assert stamps == [5_000, 5_001, 5_002, 5_003, 5_004, 5_005, 9_000]
    assert all(later > earlier for earlier, later in itertools.pairwise(stamps))


def test_clock_with_the_real_wall_clock_never_repeats() -> None:
    clock = HybridClock()
    stamps = [clock.now() for _ in range(10_000)]
    assert all(later > earlier for earlier, later in itertools.pairwise(stamps))


def test_clock_observe_never_issues_a_stamp_at_or_below_one_seen() -> None:
    clock = HybridClock(lambda: 1_000)  # physical time frozen at 1000 µs
    assert clock.now() == 1_000
    clock.observe(50_000)
    assert clock.now() == 50_001
    assert clock.lead_us() == 49_001  # how far the stamps run ahead of physical time
    clock.observe(10)  # older stamps change nothing
    assert clock.now() == 50_002


# ---- CustomerState: the per-field merge -------------------------------------------------------------


def stored(values: dict[str, Any], stamps: dict[str, int]) -> CustomerState:
    """An existing customer as read from the table."""
    return CustomerState(user_id="u", values={**dict.fromkeys(FIELDS), **values}, stamps=stamps, id=7)


def test_new_customer_gets_the_defaults_with_stamp_zero() -> None:
    state = CustomerState.new("u")
    assert state.values == {
        **dict.fromkeys(FIELDS),
        "status": 1, "business_type": "whole_rent", "room_type": "one_bedroom", "source_channel": "referral",
        "creator": "外部系统",
    }
    assert CREATE_DEFAULTS == {"status": 1, "business_type": "whole_rent", "room_type": "one_bedroom",
                               "source_channel": "referral", "creator": "外部系统"}
    assert state.stamps == {} and state.id is None
    state.apply({"status": 3}, stamp=1)  # any real value beats a default
    assert state.values["status"] == 3


def test_defaults_are_not_applied_to_an_existing_customer() -> None:
    state = stored({"status": 3, "business_type": "centralized", "creator": "某系统"},
                   {"status": 10, "business_type": 10, "creator": 10})
    state.apply({"nickname": "小张"}, stamp=20)
    assert state.values["status"] == 3
    assert state.values["business_type"] == "centralized"
    assert state.values["creator"] == "某系统"
    assert state.values["room_type"] is None  # not filled in by a default either
    assert state.values["nickname"] == "小张"


def test_merge_ignores_none_coalesce() -> None:
    state = stored({"name": "张三", "nickname": "小张"}, {"name": 10, "nickname": 10})
    state.apply({"name": None, "nickname": None, "community": "万科城"}, stamp=20)
    assert state.values["name"] == "张三" and state.values["nickname"] == "小张"
    assert state.stamps == {"name": 10, "nickname": 10, "community": 20}
    assert state.values["community"] == "万科城"
    assert state.dirty


def test_merge_newer_stamp_wins_per_field() -> None:
    state = stored({"name": "旧", "nickname": "旧"}, {"name": 10, "nickname": 30})
    state.apply({"name": "新", "nickname": "新"}, stamp=20)
    assert state.values["name"] == "新"  # 20 > 10
    assert state.values["nickname"] == "旧"  # 20 < 30: the older write loses
    assert state.stamps == {"name": 20, "nickname": 30}


def test_merge_equal_stamp_does_not_overwrite() -> None:
    state = stored({"name": "先"}, {"name": 10})
    state.apply({"name": "后"}, stamp=10)
    assert state.values["name"] == "先" and state.stamps["name"] == 10
    assert not state.would_set("name", "后", 10)
    assert state.would_set("name", "后", 11)
    assert not state.would_set("name", None, 11)


REQUESTS: list[tuple[dict[str, Any], int]] = [
    ({"nickname": "a", "status": 2, "phone": "13800138000"}, 100),
    ({"nickname": "b", "community": "万科城"}, 200),
    ({"status": 4, "community": None, "room_tags": ["loft"]}, 300),
    ({"nickname": "d", "phone": "13800138001", "room_tags": None}, 400),
]


def test_out_of_order_apply_converges_to_stamp_order() -> None:
    in_order = CustomerState.new("u")
    for fields, stamp in REQUESTS:
        in_order.apply(fields, stamp)
    assert in_order.values["nickname"] == "d"
    assert in_order.values["status"] == 4
    assert in_order.values["community"] == "万科城"
    assert in_order.values["phone"] == "13800138001"
    assert in_order.values["room_tags"] == ["loft"]
    for permutation in itertools.permutations(REQUESTS):
        state = CustomerState.new("u")
        for fields, stamp in permutation:
            state.apply(fields, stamp)
        assert (state.values, state.stamps) == (in_order.values, in_order.stamps), permutation


# ---- worker retry policy ----------------------------------------------------------------------------


def test_backoff_doubles_from_base_and_is_capped() -> None:
    assert [backoff(attempt, 0.5, 10.0) for attempt in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff(0, 0.5, 10.0) == 0.5  # attempt counts from 1; 0 is treated as the first
    assert backoff(100, 0.5, 10.0) == 10.0
    assert isinstance(backoff(1, 1, 5), float)


# ---- transient vs permanent -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        RetryableError("db restarting"),
        ConnectionRefusedError(),
        ConnectionResetError(),
        OSError("network unreachable"),
        TimeoutError(),
        ConnectionAbortedError(),
        asyncpg.exceptions.DeadlockDetectedError("deadlock"),
        asyncpg.exceptions.SerializationError("serialization"),
        asyncpg.exceptions.UniqueViolationError("lost a race"),
        asyncpg.exceptions.AdminShutdownError("shutdown"),
        asyncpg.exceptions.CannotConnectNowError("starting up"),
        asyncpg.exceptions.ConnectionFailureError("08006"),
        asyncpg.exceptions.TooManyConnectionsError("too many"),
        asyncpg.exceptions.DiskFullError("53100"),
        asyncpg.exceptions.DatabaseDroppedError("57P04"),  # class 57 by sqlstate
        asyncpg.exceptions.PostgresSystemError("58000"),  # class 58 by sqlstate
        asyncpg.exceptions.InterfaceError("connection closed"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_is_transient_true(exc: BaseException) -> None:
    assert is_transient(exc) is True


@pytest.mark.parametrize(
    "exc",
    [
        PermanentError("bad message"),
        ValueError("bug"),
        KeyError("bug"),
        asyncpg.exceptions.CheckViolationError("23514"),
        asyncpg.exceptions.NotNullViolationError("23502"),
        asyncpg.exceptions.UndefinedTableError("42P01"),
        asyncpg.exceptions.InvalidTextRepresentationError("22P02"),
        asyncpg.exceptions.RaiseError("P0001"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_is_transient_false(exc: BaseException) -> None:
    assert is_transient(exc) is False


# ---- envelope ---------------------------------------------------------------------------------------


def envelope(request_id: str = "r1", user_id: str = "u1", **payload: Any) -> RequestEnvelope:
    return RequestEnvelope(request_id=request_id, stamp=42, user_id=user_id, payload={"userId": user_id, **payload})


def test_pack_round_trip() -> None:
    first, second = envelope("r1", nickname="小张"), envelope("r2", "u2", status=3)
    raws = decode_pack(encode_pack([first, second]))
    assert [RequestEnvelope.model_validate(raw) for raw in raws] == [first, second]
    assert orjson.loads(encode_pack([first]))["v"] == SCHEMA_VERSION == 1


def test_single_envelope_decodes_as_a_pack_of_one() -> None:
    single = envelope("r9")
    assert decode_pack(single.to_json()) == [single.model_dump(mode="json")]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\x80\x81",
        b"[]",
        b'"pack"',
        b"null",
        b'{"requests": []}',  # no version
        b'{"v": 2, "requests": []}',
        b'{"v": "1", "requests": []}',
        b'{"v": 1}',
        b'{"v": 1, "requests": {}}',
        b'{"v": 1, "requests": [1, 2]}',
        b'{"v": 1, "requests": ["r1"]}',
    ],
    ids=repr,
)
def test_decode_pack_rejects_what_is_not_a_v1_pack(body: bytes) -> None:
    with pytest.raises(PermanentError):
        decode_pack(body)


def test_envelope_payload_is_revalidated_with_the_shared_model() -> None:
    assert envelope(nickname="小张").customer().nickname == "小张"
    with pytest.raises(PermanentError):
        envelope(status=9).customer()
    with pytest.raises(PermanentError):
        RequestEnvelope(request_id="r", stamp=1, user_id="u1", payload={"userId": "u2"}).customer()
    with pytest.raises(PermanentError):
        RequestEnvelope(request_id="r", stamp=1, user_id="u1", payload={}).customer()


def test_body_hash_ignores_key_order() -> None:
    assert body_hash({"a": 1, "b": "二"}) == body_hash({"b": "二", "a": 1})
    assert body_hash({"a": 1}) != body_hash({"a": 2})


def test_reply_round_trip() -> None:
    outcomes = [Outcome(request_id="r1", user_id="u", status="created", id=5),
                Outcome(request_id="r2", user_id="u", status="phone_taken", error="手机号已存在")]
    assert decode_reply(encode_reply(outcomes)) == outcomes


def test_merge_reports_fields_that_lost_to_newer_stamps() -> None:
    state = stored({"name": "新", "nickname": "旧"}, {"name": 30, "nickname": 10})
    lost = state.apply({"name": "更旧", "nickname": "较新"}, stamp=20)
    assert lost == ["name"]
    assert state.values == {**state.values, "name": "新", "nickname": "较新"}
    assert state.dirty


def test_merge_of_a_wholly_superseded_request_changes_nothing() -> None:
    state = stored({"name": "新"}, {"name": 30})
    before = (dict(state.values), dict(state.stamps))
    assert state.apply({"name": "旧"}, stamp=20) == ["name"]
    assert (state.values, state.stamps) == before
    assert not state.dirty  # the row is not rewritten, updated_at does not move
