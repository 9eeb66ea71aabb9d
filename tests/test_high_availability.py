"""High availability, end to end: a RabbitMQ node or the PostgreSQL primary dies under load and nothing
acknowledged is lost (docs/operations.md, "High availability").

Broker tests share one native 3-node cluster (``tests/ha_rabbit.py``, ~30 s to build, so module-scoped); each
test has a vhost of its own there and finds, and leaves, every node running (a killed node is started again in
the background while the test checks). Every process is given the whole node list as ``AMQP_URL``; the database
is the run's own on the machine's server. Database tests each build a primary with a synchronous standby
(``tests/ha_postgres.py``: they kill it) and use the machine's RabbitMQ.

The load (``SequentialLoad``) is tens of users, each sending numbered updates one after the other through two
gateways in turn. A 503 means "not accepted": the same step is sent again with the same Idempotency-Key; 201, 200
and 202 are acknowledgements (a 202 may be applied later) and the user moves on. Each load test checks:

* every answer is 201, 200, 202 or 503 — never a 500 — and no acknowledged update was reported superseded;
* every user's row ends at its last acknowledged step (or at a later one that was sent, answered 503 and landed
  anyway: a 503 promises nothing either way);
* acknowledgements keep coming: the longest window without one, across all users and for any one user (from
  the first try of a step to its acknowledgement), is at most ``MAX_GAP`` seconds. The figures are printed
  (``-s``) with the count of each answer, for the documentation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import socket
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest

from bench.stack import rabbitmqctl
from shared.brokers import start_position
from shared.migrate import migrate
from shared.topology import Topology, shard_for
from tests.ha_postgres import PostgresPair
from tests.ha_rabbit import RabbitCluster
from tests.helpers import customers_url, eventually, post
from tests.support import RUN_ID, Gateway, Proc, Stack, Worker, unique_user
from tests.test_faults import dead_letter_count
from tests.test_poison_and_replay import envelope_for, listed_ids, publish_dead_letters

pytestmark = pytest.mark.fault

SHARDS = 6
USERS = 30
RPC_TIMEOUT = 3  # seconds: a reply lost with a node (or a database away) turns into a 202 soon
MAX_GAP = 10.0  # seconds without an acknowledged answer, at most (issue 12)
ACKNOWLEDGED = frozenset({200, 201, 202})
APPLIED = frozenset({200, 201})
RETRY_PAUSE = 0.2  # between two tries of a step answered 503
FINISH_WITHIN = 15.0  # once the load stops, seconds a user still retries its last step (past MAX_GAP: a failure)
DATABASE = "crm_ha"


# --- the load --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    user: str
    step: int
    gateway: int  # which of the load's gateways answered
    status: int  # 0: no HTTP answer at all (the connection to the gateway failed)
    sent_at: float  # seconds since the load started
    at: float
    superseded: bool  # a 200/201 that says some of its fields lost to newer writes
    error: str  # the error message of a refusal


class SequentialLoad:
    """``users`` clients, each sending steps 0, 1, 2... of its own updates in sequence, step n through gateway
    n % len(gateways), until ``stop()``; a user then finishes its current step (within ``FINISH_WITHIN``)."""

    def __init__(self, gateways: list[Gateway], users: list[str]) -> None:
        self.urls = [customers_url(gateway) for gateway in gateways]
        self.users = users
        self.answers: list[Answer] = []
        self.sent: dict[str, int] = {}  # the last step each user sent
        self.acknowledged: dict[str, int] = {}  # the last step each user got 201/200/202 for
        self.started = time.monotonic()
        self._stop = asyncio.Event()
        self._finish_by = 0.0
        self.stopped_at = 0.0  # seconds into the load when stop() was called

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def stop(self) -> None:
        self.stopped_at = self.elapsed()
        self._finish_by = time.monotonic() + FINISH_WITHIN
        self._stop.set()

    async def run(self) -> None:
        self.started = time.monotonic()
        connector = aiohttp.TCPConnector(limit=2 * len(self.users))
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
            await asyncio.gather(*(self._client(http, user) for user in self.users))

    async def _client(self, http: aiohttp.ClientSession, user: str) -> None:
        step = 0
        while not self._stop.is_set():
            await self._send_until_acknowledged(http, user, step)
            step += 1

    async def _send_until_acknowledged(self, http: aiohttp.ClientSession, user: str, step: int) -> None:
        gateway = step % len(self.urls)
        url = self.urls[gateway]
        body = {"userId": user, "nickname": f"s{step}", "community": f"c{step}"}
        headers = {"Idempotency-Key": f"{user}-{step}"}
        self.sent[user] = step
        while True:
            sent_at = self.elapsed()
            try:
                status, answer = await post(http, url, body, headers=headers)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: not JSON
                status, answer = 0, {"error": repr(exc)}
            data = answer.get("data")
            superseded = isinstance(data, dict) and (data.get("action") == "superseded" or "supersededFields" in data)
            self.answers.append(Answer(user, step, gateway, status, sent_at, self.elapsed(),
                                       status in APPLIED and superseded, str(answer.get("error") or "")))
            if status in ACKNOWLEDGED:
                self.acknowledged[user] = step
                return
            if status not in (0, 503):
                return  # recorded, and fails the test: nothing to retry
            if self._stop.is_set() and time.monotonic() > self._finish_by:
                return
            await asyncio.sleep(RETRY_PAUSE)

    # --- what it measured ---------------------------------------------------------------------------------------

    def count(self, *statuses: int) -> int:
        return sum(answer.status in statuses for answer in self.answers)

    def longest_gap(self, statuses: frozenset[int] = ACKNOWLEDGED) -> tuple[float, float]:
        """(length, start) of the longest window without an answer in ``statuses``, from the start of the load to
        its stop."""
        times = sorted(answer.at for answer in self.answers if answer.status in statuses)
        return max((later - earlier, earlier) for earlier, later in itertools.pairwise([0.0, *times, self.stopped_at]))

    def longest_wait(self) -> tuple[float, str, int]:
        """(seconds, user, step): the longest time one user waited from first sending a step to its
        acknowledgement (to its last refusal, for a step never acknowledged)."""
        first_sent: dict[tuple[str, int], float] = {}
        waited: dict[tuple[str, int], float] = {}
        for answer in self.answers:
            key = (answer.user, answer.step)
            first_sent.setdefault(key, answer.sent_at)
            waited[key] = answer.at - first_sent[key]
        return max(((seconds, user, step) for (user, step), seconds in waited.items()), default=(0.0, "", 0))

    def report(self, fault: str, fault_at: float) -> str:
        statuses = Counter(answer.status for answer in self.answers)
        gap, gap_at = self.longest_gap()
        applied_gap, applied_gap_at = self.longest_gap(APPLIED)
        wait, wait_user, wait_step = self.longest_wait()
        others = {status: n for status, n in statuses.items() if status not in (*ACKNOWLEDGED, 503)}
        refusals = Counter((f"gateway {answer.gateway}", answer.status, answer.error) for answer in self.answers
                           if answer.status not in ACKNOWLEDGED)
        refused_at = [answer.at for answer in self.answers if answer.status not in ACKNOWLEDGED]
        window = f" from {min(refused_at):.1f} s to {max(refused_at):.1f} s" if refused_at else ""
        return (f"\nHA figures — {fault} at {fault_at:.1f} s of {self.stopped_at:.1f} s of load, {len(self.users)} "
                f"users through {len(self.urls)} gateways: {len(self.answers)} answers (201: {statuses[201]}, "
                f"200: {statuses[200]}, 202: {statuses[202]}, 503: {statuses[503]}, other: {others or 'none'}); "
                f"longest window without an acknowledged answer {gap:.2f} s (from {gap_at:.1f} s), without a "
                f"201/200 {applied_gap:.2f} s (from {applied_gap_at:.1f} s); longest wait of one user for one step "
                f"{wait:.2f} s ({wait_user} step {wait_step}); refusals{window}: {dict(refusals) or 'none'}")


async def load_through_fault(load: SequentialLoad, fault: Callable[[], Awaitable[object]], *,
                             warm_up: float = 3.0, after: float = 10.0) -> float:
    """Run ``load``; cause ``fault`` ``warm_up`` seconds in and keep the load on for ``after`` seconds more.
    Returns when the fault began, in seconds into the load."""
    running = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(warm_up)
        assert load.count(*APPLIED) > 0, "no update applied before the fault"
        fault_at = load.elapsed()
        await fault()
        await asyncio.sleep(max(0.0, fault_at + after - load.elapsed()))
    finally:
        load.stop()
        await running
    return fault_at


def assert_truthful_answers(load: SequentialLoad) -> None:
    others = Counter(answer.status for answer in load.answers if answer.status not in (*ACKNOWLEDGED, 503))
    assert not others, f"answers other than 201/200/202/503 (0: no answer): {dict(others)}"
    superseded = [answer for answer in load.answers if answer.superseded]
    assert not superseded, f"{len(superseded)} acknowledged updates lost to an older one: {superseded[:3]}"
    assert set(load.acknowledged) == set(load.users), "a user never got an update acknowledged"


async def read_steps(pool: asyncpg.Pool, users: list[str]) -> dict[str, int]:
    """The step each user's row holds (-2: nickname and community from different steps)."""
    rows = await pool.fetch("SELECT user_id, nickname, community FROM customers WHERE user_id = ANY($1)", users)
    steps = {}
    for row in rows:
        step = int(row["nickname"][1:])
        steps[row["user_id"]] = step if row["community"] == f"c{step}" else -2
    return steps


async def assert_rows_hold_the_last_acknowledged_step(load: SequentialLoad, pool: asyncpg.Pool,
                                                      messages_left: Callable[[], Awaitable[int]],
                                                      within: float = 60) -> None:
    """Once the shard queues are empty (202s applied), every row holds the user's last acknowledged step, or a
    later step it sent (answered 503 only: it may have landed)."""

    async def settled() -> bool:
        steps = await read_steps(pool, load.users)
        caught_up = all(steps.get(user, -1) >= load.acknowledged.get(user, -1) for user in load.users)
        return caught_up and await messages_left() == 0  # and none still to come

    with contextlib.suppress(AssertionError):  # the assertion below says what is missing
        await eventually(settled, within=within, interval=0.5)
    steps = await read_steps(pool, load.users)
    lost = [(user, load.acknowledged.get(user), load.sent.get(user), steps.get(user)) for user in load.users
            if not load.acknowledged.get(user, -1) <= steps.get(user, -1) <= load.sent.get(user, -1)]
    assert lost == [], (f"{len(lost)} of {len(load.users)} users' rows do not hold their last acknowledged step "
                        f"(user, acknowledged, sent, row): {lost[:5]}")


def assert_acknowledgements_kept_coming(load: SequentialLoad) -> None:
    """Windows without an acknowledged answer: across all users, and for each user (one step from its first try
    to its acknowledgement), at most MAX_GAP; and no user was left without its last step acknowledged."""
    gap, gap_at = load.longest_gap()
    assert gap <= MAX_GAP, f"no acknowledged answer for {gap:.1f} s (from {gap_at:.1f} s into the load)"
    stuck = {user: load.sent[user] for user in load.users if load.acknowledged.get(user, -1) < load.sent[user]}
    refusals = Counter((f"gateway {answer.gateway}", answer.status, answer.error) for answer in load.answers
                       if stuck.get(answer.user) == answer.step)
    assert not stuck, (f"{len(stuck)} of {len(load.users)} users never got their last step acknowledged (retried "
                       f"until {FINISH_WITHIN:.0f} s after the load stopped); their refusals: {dict(refusals)}")
    wait, user, step = load.longest_wait()
    assert wait <= MAX_GAP, f"{user} waited {wait:.1f} s for step {step} to be acknowledged"


def metrics_url(proc: Proc) -> str:
    """Where a process of ours serves /metrics: a worker on its METRICS_PORT, a gateway beside its API."""
    if isinstance(proc, Worker):
        return proc.metrics_url
    assert isinstance(proc, Gateway), proc
    return f"{proc.url}/metrics"


async def prometheus_value(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url) as response:
        text = await response.text()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in {url}"
    return float(match[1])


# --- the cluster -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    with RabbitCluster(3) as cluster:
        yield cluster


class Nodes:
    """The test's way to kill a node and start it again. A restart runs in a thread of its own (a node takes
    ~10 s to rejoin), so the test goes on meanwhile; the fixture waits for it after the test's processes stopped."""

    def __init__(self, cluster: RabbitCluster) -> None:
        self.cluster = cluster
        self.restarts: list[threading.Thread] = []

    def kill(self, node: int) -> None:
        self.cluster.kill(node)

    def restart_soon(self, node: int) -> None:
        restart = threading.Thread(target=self.cluster.start, args=(node,), daemon=True)
        restart.start()
        self.restarts.append(restart)

    def all_running(self) -> None:
        """Every node running in the cluster: restarts finished, and any node still down started."""
        for restart in self.restarts:
            restart.join(timeout=180)
        self.restarts.clear()
        for node in range(self.cluster.size):
            self.cluster.start(node)  # nothing to do for a running node
        self.cluster.wait_running()


@pytest.fixture
def vhost(cluster: RabbitCluster) -> Iterator[str]:
    """A vhost of the test's own."""
    name = f"ha_{uuid.uuid4().hex[:8]}"
    cluster.add_vhost(name)
    yield name
    with contextlib.suppress(RuntimeError):
        cluster.delete_vhost(name)


@pytest.fixture
def nodes(cluster: RabbitCluster, vhost: str) -> Iterator[Nodes]:
    """Every node running before the test and after it (a node it killed is started again)."""
    nodes = Nodes(cluster)
    nodes.all_running()
    yield nodes
    nodes.all_running()


@pytest.fixture
def cluster_stack(cluster: RabbitCluster, vhost: str, nodes: Nodes, database_url: str, tmp_path: Path,
                  ) -> Iterator[Stack]:
    """Processes given every node of the cluster; the run's database. Stopped before the nodes are waited for."""
    stack = Stack(database_url, cluster.amqp_url(vhost), prefix=f"ha{RUN_ID}{uuid.uuid4().hex[:4]}",
                  log_dir=tmp_path, SHARD_COUNT=SHARDS, RPC_TIMEOUT=RPC_TIMEOUT)
    try:
        yield stack
    finally:
        stack.stop()


def topology_of(stack: Stack) -> Topology:
    return Topology(stack.prefix, SHARDS, "quorum")


def first_node(count: int, proc: Proc) -> int:
    """The position in a list of ``count`` nodes a process of ours tries first (``shared.brokers.start_position``
    of its host name and pid)."""
    return start_position(count, f"{socket.gethostname()}:{proc.pid}")


def gateway_node(cluster: RabbitCluster, vhost: str, gateway: Gateway) -> int:
    """The node a gateway is connected to, from the broker's connection list (its name carries the instance)."""
    connected = re.compile(r"gateway ([0-9a-f]{12}) connected")
    gateway.wait_until(lambda: bool(connected.search(gateway.output())), "logging its instance", timeout=10)
    instance = connected.findall(gateway.output())[-1]
    [node] = [c["node"] for c in cluster.client_connections(vhost) if c["name"] == f"crm-gateway-{instance}"]
    return int(node)


def start_gateways_on(cluster: RabbitCluster, vhost: str, stack: Stack, wanted: list[int]) -> list[Gateway]:
    """A gateway on each node of ``wanted``. With every node up a process connects to its first node, known from its
    pid: one that would start elsewhere is killed before it connects, and another one started."""
    gateways = []
    for node in wanted:
        gateway = stack.start_gateway(wait=False)
        while first_node(cluster.size, gateway) != node:
            gateway.kill()
            gateway = stack.start_gateway(wait=False)
        gateways.append(gateway)
    for gateway, node in zip(gateways, wanted, strict=True):
        gateway.wait_healthy()
        assert gateway_node(cluster, vhost, gateway) == node
    return gateways


def shard_leaders(cluster: RabbitCluster, vhost: str, stack: Stack) -> Counter[int]:
    """How many shard queues each node leads."""
    topology = topology_of(stack)
    shards = {topology.shard_queue(shard) for shard in range(SHARDS)}
    return Counter(cluster.node_index_of(queue["leader"]) for queue in cluster.queues(vhost, "leader")
                   if queue["name"] in shards)


def cluster_messages(cluster: RabbitCluster, vhost: str, stack: Stack) -> Callable[[], Awaitable[int]]:
    """Messages (ready or unacked) in the stack's shard queues on the cluster (-1: cannot tell right now)."""
    prefix = f"{stack.prefix}.shard."

    async def count() -> int:
        try:
            queues = await asyncio.to_thread(cluster.queues, vhost, "messages")
        except RuntimeError:  # list_queues fails while a restarted node is still joining: not known yet
            return -1
        return sum(int(queue["messages"]) for queue in queues if queue["name"].startswith(prefix))

    return count


def one_node(stack: Stack, cluster: RabbitCluster, vhost: str, node: int) -> Stack:
    """The stack seen through one node's URL: for helpers that connect with plain aio-pika."""
    return Stack(stack.database_url, cluster.url(node, vhost), stack.prefix, stack.log_dir)


async def wait_queue_messages(cluster: RabbitCluster, vhost: str, queue: str, count: int) -> None:
    async def holds() -> bool:
        return bool((await asyncio.to_thread(cluster.queue_info, vhost, queue, "messages"))["messages"] == count)

    await eventually(holds, interval=0.2, what=f"{queue} holding {count} messages")


# --- broker tests ----------------------------------------------------------------------------------------------


async def test_a_process_given_a_node_list_connects_to_one_that_answers_and_spreads_over_the_nodes(
    cluster: RabbitCluster, vhost: str, nodes: Nodes, cluster_stack: Stack, http: aiohttp.ClientSession
) -> None:
    stack, dead = cluster_stack, 0
    await asyncio.to_thread(nodes.kill, dead)
    # A gateway whose first node is the dead one, workers starting at every node, and a gateway given a list of
    # two whose first is the dead one. The start node follows from the pid (shared.brokers.start_position): a
    # process that would add nothing new is killed before it connects, and another one started.
    gateway = stack.start_gateway(wait=False)
    while first_node(cluster.size, gateway) != dead:
        gateway.kill()
        gateway = stack.start_gateway(wait=False)
    workers: dict[int, Worker] = {}
    while len(workers) < cluster.size:
        worker = stack.start_worker(wait=False)
        if first_node(cluster.size, worker) in workers:
            worker.kill()
        else:
            workers[first_node(cluster.size, worker)] = worker
    two_nodes = f"{cluster.url(dead, vhost)},{cluster.url(1, vhost)}"
    second = stack.start_gateway(wait=False, AMQP_URL=two_nodes)
    while first_node(2, second) != 0:
        second.kill()
        second = stack.start_gateway(wait=False, AMQP_URL=two_nodes)
    for started in (gateway, second):
        started.wait_healthy()
    for worker in workers.values():
        worker.wait_consuming()

    # Each is on the first node of its rotation that answers: the one after the dead node for those starting there.
    expected = Counter((first_node(cluster.size, proc) + (first_node(cluster.size, proc) == dead)) % cluster.size
                       for proc in [gateway, *workers.values()])
    expected[1] += 1  # the gateway given two nodes
    connections = await asyncio.to_thread(cluster.client_connections, vhost)
    nodes.restart_soon(dead)
    assert Counter(c["node"] for c in connections) == expected, connections
    assert len(expected) > 1  # spread: both live nodes hold connections
    for started in (gateway, second):
        status, body = await post(http, customers_url(started), {"userId": unique_user("ha")})
        assert status == 201, body


async def test_every_queue_is_quorum_with_a_replica_on_every_node_and_leaders_spread(
    cluster: RabbitCluster, vhost: str, cluster_stack: Stack
) -> None:
    cluster_stack.start_worker()
    topology = topology_of(cluster_stack)
    names = [*(topology.shard_queue(shard) for shard in range(SHARDS)), topology.dead_letter_queue]

    queues = {queue["name"]: queue for queue in await asyncio.to_thread(cluster.queues, vhost, "type", "members",
                                                                          "leader")}
    assert sorted(queues) == sorted(names)
    for name in names:
        assert queues[name]["type"] == "quorum", queues[name]
        assert sorted(queues[name]["members"]) == sorted(cluster.node_names), queues[name]
    leaders = Counter(queues[name]["leader"] for name in names)
    print(f"\nHA figures — leaders of {len(names)} queues: {dict(leaders)}")
    assert len(leaders) > 1, leaders


async def test_a_node_leading_the_most_shard_queues_killed_under_load_loses_no_acknowledged_update(
    cluster: RabbitCluster, vhost: str, nodes: Nodes, cluster_stack: Stack, db: asyncpg.Pool
) -> None:
    stack = cluster_stack
    for _ in range(2):
        stack.start_worker()
    [(victim, leads)] = shard_leaders(cluster, vhost, stack).most_common(1)
    # The gateways on the other nodes: this test is about losing leaders (the next one, a gateway's node).
    gateways = start_gateways_on(cluster, vhost, stack, [node for node in range(cluster.size) if node != victim])
    load = SequentialLoad(gateways, [unique_user("halead") for _ in range(USERS)])

    fault_at = await load_through_fault(load, lambda: asyncio.to_thread(nodes.kill, victim))
    nodes.restart_soon(victim)  # down for the whole load: meanwhile, the checks

    print(load.report(f"kill -9 of node {victim} (leader of {leads} of {SHARDS} shard queues; no gateway on it)",
                      fault_at))
    assert_truthful_answers(load)
    await assert_rows_hold_the_last_acknowledged_step(load, db, cluster_messages(cluster, vhost, stack))
    assert_acknowledgements_kept_coming(load)


async def test_the_node_a_gateway_is_connected_to_killed_under_load_loses_no_acknowledged_update(
    cluster: RabbitCluster, vhost: str, nodes: Nodes, cluster_stack: Stack, db: asyncpg.Pool
) -> None:
    stack = cluster_stack
    for _ in range(2):
        stack.start_worker()
    gateway_a, gateway_b = start_gateways_on(cluster, vhost, stack, [1, 2])
    victim = 1  # gateway A's node
    leads = shard_leaders(cluster, vhost, stack)[victim]
    load = SequentialLoad([gateway_a, gateway_b], [unique_user("hagw") for _ in range(USERS)])

    fault_at = await load_through_fault(load, lambda: asyncio.to_thread(nodes.kill, victim))

    moved_to = gateway_node(cluster, vhost, gateway_a)
    nodes.restart_soon(victim)  # down for the whole load: meanwhile, the checks
    print(load.report(f"kill -9 of node {victim} (gateway A's; leader of {leads} of {SHARDS} shard queues; "
                      f"gateway A moved to node {moved_to})", fault_at))
    assert moved_to != victim
    assert_truthful_answers(load)
    await assert_rows_hold_the_last_acknowledged_step(load, db, cluster_messages(cluster, vhost, stack))
    assert_acknowledgements_kept_coming(load)


async def test_a_gateway_accepts_again_for_a_shard_whose_leader_died_before_the_gateway_ever_published_there(
    cluster: RabbitCluster, vhost: str, nodes: Nodes, cluster_stack: Stack, http: aiohttp.ClientSession
) -> None:
    """The case behind the previous test's stuck users, made deterministic: the gateway's first publish to a shard
    queue comes while that queue's leader node is down. 503 then (not accepted), accepted again once a new leader
    is elected: within MAX_GAP of the kill."""
    stack = cluster_stack
    stack.start_worker()
    queue = topology_of(stack).shard_queue(0)
    victim = cluster.node_index_of(await asyncio.to_thread(cluster.queue_leader, vhost, queue))
    [gateway] = start_gateways_on(cluster, vhost, stack, [(victim + 1) % cluster.size])
    user = next(user for user in (unique_user("hafirst") for _ in range(1000)) if shard_for(user, SHARDS) == 0)
    url, body, key = customers_url(gateway), {"userId": user}, {"Idempotency-Key": user}

    await asyncio.to_thread(nodes.kill, victim)
    killed_at = time.monotonic()
    refusals: Counter[str] = Counter()
    while (answer := await post(http, url, body, headers=key))[0] not in ACKNOWLEDGED:
        status, refusal = answer
        refusals[f"{status} {refusal.get('error')}"] += 1
        waited = time.monotonic() - killed_at
        if status != 503 or waited > MAX_GAP:
            leader_now = await asyncio.to_thread(cluster.queue_leader, vhost, queue)
            pytest.fail(f"not accepted {waited:.1f} s after node {victim}, the leader of {queue}, was killed (its "
                        f"leader now: {leader_now}); answers: {dict(refusals)}")
        await asyncio.sleep(RETRY_PAUSE)
    print(f"\nHA figures — first publish to {queue} while its leader node was down: accepted "
          f"{time.monotonic() - killed_at:.1f} s after the kill; answers before: {dict(refusals) or 'none'}")
    nodes.restart_soon(victim)


async def test_dead_letters_are_still_listed_after_their_leader_node_dies(
    cluster: RabbitCluster, vhost: str, nodes: Nodes, cluster_stack: Stack
) -> None:
    stack = cluster_stack
    dead_queue = topology_of(stack).dead_letter_queue
    letters = [envelope_for(unique_user("hadead"), nickname="x") for _ in range(3)]
    await publish_dead_letters(one_node(stack, cluster, vhost, 0), letters)
    await wait_queue_messages(cluster, vhost, dead_queue, len(letters))
    leader = cluster.node_index_of(await asyncio.to_thread(cluster.queue_leader, vhost, dead_queue))

    await asyncio.to_thread(nodes.kill, leader)
    listed = await listed_ids(stack)
    nodes.restart_soon(leader)

    assert sorted(listed) == sorted(letter.request_id for letter in letters)


async def test_listing_dead_letters_under_a_delivery_limit_policy_loses_nothing(
    cluster: RabbitCluster, vhost: str, cluster_stack: Stack
) -> None:
    stack = cluster_stack
    dead_queue = topology_of(stack).dead_letter_queue
    through_node = one_node(stack, cluster, vhost, 1)
    letters = [envelope_for(unique_user("halimit"), nickname="x") for _ in range(2)]
    await publish_dead_letters(through_node, letters)
    await asyncio.to_thread(cluster.set_policy, "dead-letter-limit", f"^{re.escape(dead_queue)}$",
                            {"delivery-limit": 5}, vhost=vhost, apply_to="queues")  # 3.10: no "quorum_queues"
    await wait_policy(cluster, vhost, dead_queue, "dead-letter-limit")

    for listing in range(8):
        if listing % 3 == 1:  # more dead letters arrive between listings
            more = envelope_for(unique_user("halimit"), nickname="x")
            await publish_dead_letters(through_node, [more])
            letters.append(more)
        listed = await listed_ids(stack)
        assert sorted(listed) == sorted(letter.request_id for letter in letters), f"listing {listing + 1}"


async def wait_policy(cluster: RabbitCluster, vhost: str, queue: str, policy: str) -> None:
    async def applied() -> bool:
        return bool((await asyncio.to_thread(cluster.queue_info, vhost, queue, "policy"))["policy"] == policy)

    await eventually(applied, interval=0.2, what=f"policy {policy} applied to {queue}")


# --- database tests --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def failover_stack(amqp_url: str, log_dir: Path, clock_offset_seconds: float = 0,
                         ) -> AsyncIterator[tuple[PostgresPair, Stack]]:
    """A primary with a synchronous standby, a migrated database on it, and a stack whose DATABASE_URL names both
    servers (read-write only: whichever is the primary now). Processes are stopped before the servers."""
    async with PostgresPair(clock_offset_seconds=clock_offset_seconds) as pair:
        await asyncio.to_thread(pair.create_database, DATABASE)
        await migrate(pair.url(DATABASE))
        stack = Stack(pair.url(DATABASE), amqp_url, prefix=f"hapg{RUN_ID}{uuid.uuid4().hex[:4]}", log_dir=log_dir,
                      SHARD_COUNT=SHARDS, RPC_TIMEOUT=RPC_TIMEOUT, MIGRATE_ON_START="false")
        try:
            yield pair, stack
        finally:
            stack.stop()


def machine_messages(amqp_url: str, stack: Stack) -> Callable[[], Awaitable[int]]:
    """Messages (ready or unacked) in the stack's shard queues on this machine's RabbitMQ."""
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).path[1:]) or "/"
    prefix = f"{stack.prefix}.shard."

    async def count() -> int:
        listing = await asyncio.to_thread(rabbitmqctl, "list_queues", "-q", "-p", vhost, "name", "messages",
                                          "--formatter", "json")
        return sum(int(queue["messages"]) for queue in orjson.loads(listing.stdout)
                   if queue["name"].startswith(prefix))

    return count


async def fail_over(pair: PostgresPair, promote_after: float = 1.5) -> None:
    """kill -9 of the primary, then the standby promoted (as an operator or Patroni would) a moment later."""
    await asyncio.to_thread(pair.kill_primary)
    await asyncio.sleep(promote_after)
    await asyncio.to_thread(pair.promote_standby)


async def failover_under_load(pair: PostgresPair, stack: Stack, amqp_url: str, label: str) -> SequentialLoad:
    """Two workers and two gateways; the primary killed under load and the standby promoted; every check."""
    for _ in range(2):
        stack.start_worker()
    gateways = [stack.start_gateway() for _ in range(2)]
    load = SequentialLoad(gateways, [unique_user(label) for _ in range(USERS)])

    fault_at = await load_through_fault(load, lambda: fail_over(pair))

    print(load.report(f"kill -9 of the PostgreSQL primary, standby promoted 1.5 s later ({label})", fault_at))
    assert_truthful_answers(load)
    pool = await asyncpg.create_pool(pair.url(DATABASE), min_size=1, max_size=2)
    try:
        assert await pool.fetchval("SELECT inet_server_port()") == pair.standby_port
        await assert_rows_hold_the_last_acknowledged_step(load, pool, machine_messages(amqp_url, stack))
    finally:
        await pool.close()
    assert_acknowledgements_kept_coming(load)
    return load


async def test_a_primary_killed_under_load_loses_no_acknowledged_write(amqp_url: str, tmp_path: Path) -> None:
    async with failover_stack(amqp_url, tmp_path) as (pair, stack):
        await failover_under_load(pair, stack, amqp_url, "hapg")


async def test_a_failover_to_a_standby_whose_clock_is_behind_keeps_causal_order(
    amqp_url: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with failover_stack(amqp_url, tmp_path, clock_offset_seconds=-30) as (pair, stack):
        await failover_under_load(pair, stack, amqp_url, "haclock")

        # The step back of the clock was seen, logged and counted by every process.
        for proc in stack.procs:
            assert "database server changed" in proc.output(), proc.log_path
            assert await prometheus_value(http, metrics_url(proc), "crm_clock_steps_total") >= 1, proc.log_path


async def test_a_worker_connected_to_a_standby_never_dead_letters(
    amqp_url: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with failover_stack(amqp_url, tmp_path) as (pair, stack):
        # The worker knows only the standby (no target_session_attrs): every write it tries is refused read-only.
        # Few, quick retries: a request treated as failing would be dead-lettered within seconds.
        worker = stack.start_worker(DATABASE_URL=pair.standby_url(DATABASE), MAX_ATTEMPTS=3, RETRY_BASE_DELAY=0.2,
                                    RETRY_MAX_DELAY=1)
        gateway = stack.start_gateway(DATABASE_URL=pair.primary_url(DATABASE))
        user = unique_user("hastandby")

        status, body = await post(http, customers_url(gateway), {"userId": user, "name": "x"})
        assert status == 202, body
        request_id = body["data"]["requestId"]
        await asyncio.sleep(5)  # many read-only refusals later (with these retries a dead letter takes ~2 s)

        assert "read-only" in worker.output()
        assert await dead_letter_count(stack) == 0
        assert await listed_ids(stack, "--user-id", user) == []

        await asyncio.to_thread(pair.promote_standby)
        promoted = await asyncpg.connect(pair.standby_url(DATABASE))
        try:

            async def applied() -> str | None:
                name: str | None = await promoted.fetchval("SELECT name FROM customers WHERE user_id = $1", user)
                return name

            assert await eventually(applied, within=30, what="applied once the standby was promoted") == "x"
            assert await promoted.fetchval("SELECT count(*) FROM failed_requests WHERE request_id = $1",
                                           request_id) == 0
        finally:
            await promoted.close()
        assert await dead_letter_count(stack) == 0
