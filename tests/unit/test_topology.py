"""The topology's pure rules: the shard of a userId, names, the marker value, and reading RabbitMQ's
PRECONDITION_FAILED text."""

from __future__ import annotations

import pytest
from aio_pika.exceptions import ChannelPreconditionFailed

from shared.topology import (
    Topology,
    TopologyMismatch,
    _current_value,
    describe_marker,
    format_marker,
    parse_marker,
    shard_for,
)

# ---- shard_for: the queue a userId's requests go to ------------------------------------------------------

# crc32 values fixed here, not recomputed: a change of hash function would silently move every userId
# to another shard and break per-user ordering across a rolling deploy. 0xCBF43926 is CRC-32's check value.
KNOWN_SHARDS = [
    ("123456789", 8, 0xCBF43926 % 8),
    ("123456789", 16, 6),
    ("123456789", 1024, 294),
    ("agent_user_12345", 8, 3),
    ("agent_user_67890", 8, 2),
    ("a", 8, 3),
    ("张三", 8, 2),  # UTF-8 bytes of the userId
    ("", 8, 0),
]


@pytest.mark.parametrize(("user_id", "shard_count", "expected"), KNOWN_SHARDS)
def test_shard_for_is_crc32_modulo_shard_count(user_id: str, shard_count: int, expected: int) -> None:
    assert shard_for(user_id, shard_count) == expected


@pytest.mark.parametrize("shard_count", [1, 3, 8, 64])
def test_shard_for_spreads_users_over_every_shard_and_no_other(shard_count: int) -> None:
    users = [f"user-{i}" for i in range(2000)]
    assert {shard_for(user, shard_count) for user in users} == set(range(shard_count))


def test_topology_routes_a_user_to_its_shard_queue() -> None:
    topology = Topology("crm", 8, "quorum")
    assert topology.exchange == "crm.requests"
    assert topology.routing_key_for("agent_user_12345") == "shard.3"
    assert topology.shard_queue(3) == "crm.shard.3"
    assert topology.dead_letter_queue == "crm.dead"


def test_marker_value_round_trips() -> None:
    assert format_marker(3, "quorum", "quorum") == "shard-count=3,queue-type=quorum,dead=quorum"
    assert parse_marker(format_marker(3, "quorum", "quorum")) == (3, "quorum", "quorum")
    assert parse_marker(format_marker(1024, "classic", "classic")) == (1024, "classic", "classic")


@pytest.mark.parametrize("value", ["", "shard-count=x,queue-type=quorum", "shard-count=3", "crm.alternate"])
def test_a_marker_we_did_not_write_is_not_parsed(value: str) -> None:
    assert parse_marker(value) is None


def test_marker_is_named_after_the_prefix_and_differs_with_the_topology() -> None:
    two, three = Topology("crm", 2, "quorum"), Topology("crm", 3, "quorum")

    assert two.marker_exchange == "crm.topology"
    assert two.marker_value != three.marker_value
    assert Topology("crm", 2, "classic").marker_value != two.marker_value


@pytest.mark.parametrize(
    ("text", "current"),
    [
        # RabbitMQ 3.10+ when both values are strings
        ("PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange 'crm.topology' in vhost '/': "
         "received 'shard-count=3,queue-type=quorum' but current is 'shard-count=2,queue-type=quorum'",
         "shard-count=2,queue-type=quorum"),
        # when the types differ
        ("PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange 'x' in vhost '/': received the "
         "value 'a' of type 'longstr' but current is the value 'b' of type 'longstr'", "b"),
        ("PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'crm.shard.0' in vhost '/': received "
         "'quorum' but current is 'classic'", "classic"),
        ("PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange 'x' in vhost '/': received the "
         "value 'x' of type 'longstr' but current is none", None),
    ],
    ids=["same-type", "typed", "queue-type", "none"],
)
def test_current_value_is_read_from_the_broker_text(text: str, current: str | None) -> None:
    assert _current_value(ChannelPreconditionFailed(text)) == current


def test_queue_type_mismatch_names_both_types() -> None:
    error = Topology("crm", 2, "quorum")._queue_mismatch("crm.shard.0", ChannelPreconditionFailed(
        "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'crm.shard.0' in vhost '/': received "
        "'quorum' but current is 'classic'"))

    assert isinstance(error, TopologyMismatch)
    assert "x-queue-type classic" in str(error) and "QUEUE_TYPE=quorum" in str(error)
    assert "\n" not in str(error)


def test_a_marker_cut_short_by_the_broker_is_still_described() -> None:
    # RabbitMQ cuts its PRECONDITION_FAILED text at 255 characters: long vhost and prefix names cut the value.
    text = ("PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange 'a-long-prefix.topology' in "
            "vhost 'a-long-vhost': received 'shard-count=3,queue-type=quorum,dead=quorum' but current is "
            "'shard-count=2,queue-type=quorum,de")
    current = _current_value(ChannelPreconditionFailed(text), truncated=True)

    assert current is not None and describe_marker(current) == "SHARD_COUNT=2 QUEUE_TYPE=quorum"
    assert describe_marker("shard-count=2,queue-type=quorum") == (
        "SHARD_COUNT=2 QUEUE_TYPE=quorum (dead letters: classic queue)")
