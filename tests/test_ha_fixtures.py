"""The HA fixtures themselves: a 3-node RabbitMQ cluster and a PostgreSQL primary with a synchronous standby.

These tests are about ``tests/ha_rabbit.py`` and ``tests/ha_postgres.py``, not the service: they use aio_pika
and asyncpg directly, and prove that what the HA tests will rely on holds (nodes cluster, a quorum queue
outlives its leader, a killed node comes back, the standby is synchronous, a promoted standby takes writes
through the multi-host URL, the standby's clock can be shifted).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aio_pika
import asyncpg
import pytest

from tests.ha_postgres import PostgresPair
from tests.ha_rabbit import RabbitCluster
from tests.helpers import eventually

pytestmark = pytest.mark.fault

VHOST = "ha_fixtures"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    with RabbitCluster(3) as cluster:
        cluster.add_vhost(VHOST)
        yield cluster


@pytest.fixture
def pair() -> Iterator[PostgresPair]:
    with PostgresPair() as pair:
        yield pair


# --- RabbitMQ --------------------------------------------------------------------------------------------------


def test_the_cluster_forms_with_every_node_running(cluster: RabbitCluster) -> None:
    assert cluster.build_seconds is not None and cluster.build_seconds < 60, cluster.build_seconds
    for node in range(3):
        assert sorted(cluster.running_nodes(node)) == sorted(cluster.node_names)
    assert len(set(cluster.ports)) == 3
    assert cluster.amqp_url(VHOST).split(",") == cluster.urls(VHOST)


async def test_connections_are_counted_on_their_node(cluster: RabbitCluster) -> None:
    connection = await aio_pika.connect(cluster.url(1, VHOST))
    async with connection:
        counts = await asyncio.to_thread(lambda: [cluster.connections_on(node) for node in range(3)])
        assert counts[1] >= 1
        assert counts[0] == counts[2] == 0


async def get_one(queue: aio_pika.abc.AbstractQueue, within: float = 15) -> bytes:
    async def got() -> aio_pika.abc.AbstractIncomingMessage | None:
        return await queue.get(no_ack=True, fail=False)

    message = await eventually(got, within=within, interval=0.2, what=f"a message in {queue.name}")
    return message.body


async def test_a_quorum_queue_outlives_its_killed_leader_and_the_node_comes_back(cluster: RabbitCluster) -> None:
    name = "ha_fixtures_qq"
    arguments: dict[str, aio_pika.abc.FieldValue] = {"x-queue-type": "quorum", "x-quorum-initial-group-size": 3}
    connection = await aio_pika.connect(cluster.url(0, VHOST))
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True, arguments=arguments)
    assert sorted(await asyncio.to_thread(cluster.queue_members, VHOST, name)) == sorted(cluster.node_names)

    leader = cluster.node_index_of(await asyncio.to_thread(cluster.queue_leader, VHOST, name))
    pid = cluster.pid(leader)
    assert pid is not None
    await asyncio.to_thread(cluster.kill, leader)
    assert cluster.pid(leader) is None

    new_leader = await asyncio.to_thread(cluster.wait_queue_leader, VHOST, name)
    assert new_leader != cluster.node_names[leader]
    other = (leader + 1) % 3
    connection = await aio_pika.connect(cluster.url(other, VHOST))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
        await asyncio.wait_for(
            channel.default_exchange.publish(aio_pika.Message(b"after the kill"), routing_key=name), 30
        )
        assert await get_one(queue) == b"after the kill"

    await asyncio.to_thread(cluster.start, leader)
    assert cluster.node_names[leader] in await asyncio.to_thread(cluster.running_nodes)
    assert cluster.pid(leader) not in (None, pid)
    connection = await aio_pika.connect(cluster.url(leader, VHOST))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
        await channel.default_exchange.publish(aio_pika.Message(b"back"), routing_key=name)
        assert await get_one(queue) == b"back"
        await queue.delete(if_unused=False, if_empty=False)


# --- PostgreSQL ----------------------------------------------------------------------------------------------


async def test_the_standby_is_synchronous_and_has_what_the_primary_wrote(pair: PostgresPair) -> None:
    assert pair.sync_state() == "sync"
    await asyncio.to_thread(pair.create_database, "ha")
    primary = await asyncpg.connect(pair.primary_url("ha"))
    try:
        await primary.execute("CREATE TABLE t (v text)")
        await primary.execute("INSERT INTO t VALUES ('written on the primary')")
    finally:
        await primary.close()
    # Synchronous: flushed on the standby before the commit returned; visible there once replayed.
    await asyncio.to_thread(pair.wait_replayed)
    standby = await asyncpg.connect(pair.standby_url("ha"))
    try:
        assert await standby.fetchval("SELECT pg_is_in_recovery()")
        assert await standby.fetchval("SELECT v FROM t") == "written on the primary"
    finally:
        await standby.close()


async def test_after_the_primary_dies_the_promoted_standby_takes_writes_through_the_multi_host_url(
    pair: PostgresPair,
) -> None:
    await asyncio.to_thread(pair.create_database, "ha")
    connection = await asyncpg.connect(pair.url("ha"))
    try:
        assert await connection.fetchval("SELECT inet_server_port()") == pair.primary_port
        await connection.execute("CREATE TABLE t (v text)")
        await connection.execute("INSERT INTO t VALUES ('before')")
    finally:
        await connection.close()

    await asyncio.to_thread(pair.kill_primary)
    assert pair.primary_pid() is None
    await asyncio.to_thread(pair.promote_standby)

    connection = await asyncpg.connect(pair.url("ha"), timeout=10)
    try:
        assert await connection.fetchval("SELECT inet_server_port()") == pair.standby_port
        assert await connection.fetchval("SELECT pg_is_in_recovery()") is False
        await connection.execute("INSERT INTO t VALUES ('after')")
        assert await connection.fetchval("SELECT string_agg(v, ',' ORDER BY v DESC) FROM t") == "before,after"
    finally:
        await connection.close()


async def test_the_standby_clock_can_run_behind_the_primary() -> None:
    async with PostgresPair(clock_offset_seconds=-30) as pair:
        primary = await asyncpg.connect(pair.primary_url())
        standby = await asyncpg.connect(pair.standby_url())
        try:
            before = await primary.fetchval("SELECT clock_timestamp()")
            on_standby = await standby.fetchval("SELECT clock_timestamp()")
            after = await primary.fetchval("SELECT clock_timestamp()")
        finally:
            await primary.close()
            await standby.close()
        assert pair.sync_state() == "sync"
    behind = (before + (after - before) / 2 - on_standby).total_seconds()
    assert 28 < behind < 32, behind
