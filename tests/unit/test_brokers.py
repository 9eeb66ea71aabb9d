"""Node lists (shared/brokers.py): parsing, masking, the order a process tries the nodes in, and the hook."""

from __future__ import annotations

from collections import Counter

import pytest
from aio_pika.robust_connection import RobustConnection

from shared.brokers import NodeListConnection, NodesUnreachable, node_urls, rotation, start_position
from shared.cli import describe_amqp_error
from shared.masking import mask_url
from shared.topology import parse_marker

THREE = "amqp://guest:s1@127.0.0.1:6520/v,amqp://other:s2@127.0.0.1:6521/v, amqp://guest:s3@127.0.0.1:6522/v"


def test_node_list_is_split_on_commas_with_blanks_dropped() -> None:
    assert node_urls(THREE + ",") == [
        "amqp://guest:s1@127.0.0.1:6520/v", "amqp://other:s2@127.0.0.1:6521/v", "amqp://guest:s3@127.0.0.1:6522/v"]


def test_one_url_is_a_list_of_one() -> None:
    assert node_urls("amqp://guest:guest@127.0.0.1:5672/") == ["amqp://guest:guest@127.0.0.1:5672/"]


@pytest.mark.parametrize("value", ["", " , ", "amqp://a:secret@h/v,http://b:secret@h/v", "amqp://a:secret@h:x/v",
                                   "amqp://a:secret@/v"])
def test_a_bad_node_list_is_refused_without_echoing_a_password(value: str) -> None:
    with pytest.raises(ValueError) as caught:
        node_urls(value)
    assert "secret" not in str(caught.value)


def test_every_url_of_a_node_list_is_masked() -> None:
    masked = mask_url(THREE)

    assert "s1" not in masked and "s2" not in masked and "s3" not in masked
    assert masked.count(":***@") == 3 and masked.count("amqp://") == 3


def test_a_libpq_url_with_several_hosts_stays_one_url_when_masked() -> None:
    assert mask_url("postgresql://crm:pw@h1:5432,h2:5433/crm?target_session_attrs=read-write") == (
        "postgresql://crm:***@h1:5432,h2:5433/crm?target_session_attrs=read-write")


def test_rotation_starts_at_the_position_and_wraps_around() -> None:
    assert rotation(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotation(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert rotation(["a", "b", "c"], 5) == ["c", "a", "b"]


def test_start_position_is_stable_per_process_and_spreads_processes() -> None:
    assert start_position(3, "host-a:1") == start_position(3, "host-a:1")
    assert start_position(1, "anything") == 0
    spread = Counter(start_position(3, f"worker-{n}:1") for n in range(300))
    assert set(spread) == {0, 1, 2} and min(spread.values()) > 60


def test_nodes_unreachable_names_every_node_with_its_reason_and_no_password() -> None:
    failures = [(mask_url(url), ConnectionRefusedError(111, "Connection refused")) for url in node_urls(THREE)]
    line = describe_amqp_error(NodesUnreachable(failures), THREE)

    assert "none of 3 nodes answered" in line
    assert line.count("connection refused") == 3
    assert "s1" not in line and "s2" not in line and "s3" not in line


def test_the_reconnect_hook_node_list_connection_overrides_exists_in_aio_pika() -> None:
    # NodeListConnection overrides this private method; if aio-pika renames it, failover silently stops working.
    assert hasattr(RobustConnection, "_RobustConnection__connect_transport")
    assert "_RobustConnection__connect_transport" in NodeListConnection.__dict__


def test_a_marker_from_before_quorum_dead_letters_reads_as_classic_dead_letters() -> None:
    assert parse_marker("shard-count=2,queue-type=quorum") == (2, "quorum", "classic")
    assert parse_marker("shard-count=2,queue-type=quorum,dead=quorum") == (2, "quorum", "quorum")
