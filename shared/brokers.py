"""RabbitMQ node lists: ``AMQP_URL`` may name every node of a cluster, comma-separated.

    AMQP_URL=amqp://u:p@rabbit1:5672/crm,amqp://u:p@rabbit2:5672/crm,amqp://u:p@rabbit3:5672/crm

aio-pika connects to one URL and, when it loses the connection, reconnects to that same URL: a process would
wait for the very node that died. This module is the smallest piece that fixes it:

* ``node_urls`` parses and checks the list (``shared.masking.mask_url`` shows it without any password).
* ``rotation`` orders the nodes for one process: it starts at a position taken from the host name and pid
  (``start_position``), so that many processes spread over the nodes instead of all crowding the first.
* ``NodeListConnection`` is aio-pika's ``RobustConnection`` (same channel, queue and consumer recovery) with
  one change: every connection attempt tries the nodes in rotation order until one answers, and after a lost
  connection it starts with the node *after* the one it lost.
* ``connect_robust`` / ``connect_once`` are what the processes call: long-lived (gateway, worker) and one-shot
  (replay tool, ``--check``, benchmarks). Both fail with ``NodesUnreachable`` naming every node and why.

The other option is a TCP load balancer (HAProxy, a cloud LB, a Kubernetes Service) in front of the nodes and
one URL: it also moves clients on, but it is one more component to run and make highly available, and it hides
which node a client is on from the broker's connection list. The list needs neither (docs/operations.md, "High
availability").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import urllib.parse
import zlib
from collections.abc import Sequence
from typing import Any, Final

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aio_pika.robust_connection import RobustConnection
from yarl import URL

from shared.masking import mask_url

log = logging.getLogger("brokers")

# Between two rounds over the whole list when no node answered (aio-pika's default is 5 s: too long for the
# "answer within 10 s of a node loss" goal; one round is already one attempt per node).
RECONNECT_INTERVAL: Final = 1.0
SCHEMES: Final = ("amqp", "amqps")


class NodesUnreachable(ConnectionError):
    """No node of the list answered; ``failures`` holds (masked URL, exception) for each."""

    def __init__(self, failures: Sequence[tuple[str, BaseException]]) -> None:
        self.failures = list(failures)
        super().__init__("; ".join(f"{url}: {exc.__class__.__name__}: {exc}" for url, exc in self.failures))


def node_urls(value: str) -> list[str]:
    """The URLs of ``AMQP_URL``: split on commas, blanks dropped; raises ``ValueError`` for a bad one.

    No password is echoed in an error: only the position of the URL in the list and what is wrong.
    """
    urls = [part.strip() for part in value.split(",") if part.strip()]
    if not urls:
        raise ValueError("must name at least one amqp:// URL")
    for position, url in enumerate(urls, start=1):
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as exc:
            raise ValueError(f"URL {position} of {len(urls)} is not a URL ({exc})") from None
        if parts.scheme not in SCHEMES:
            raise ValueError(f"URL {position} of {len(urls)} must start with amqp:// or amqps://")
        if not parts.hostname:
            raise ValueError(f"URL {position} of {len(urls)} names no host")
    return urls


def start_position(count: int, identity: str | None = None) -> int:
    """Where this process starts in a list of ``count`` nodes: stable for the process, spread across processes.

    The identity is host name and pid: containers of one service differ by host name (their pid is often 1),
    native processes on one host by pid.
    """
    if count <= 1:
        return 0
    identity = identity if identity is not None else f"{socket.gethostname()}:{os.getpid()}"
    return zlib.crc32(identity.encode()) % count


def rotation(urls: Sequence[str], start: int) -> list[str]:
    """``urls`` starting at ``start`` and wrapping around: the order in which a process tries the nodes."""
    start %= len(urls)
    return [*urls[start:], *urls[:start]]


class NodeListConnection(RobustConnection):
    """A ``RobustConnection`` over a list of nodes (see the module docstring).

    aio-pika runs every (re)connection attempt through ``RobustConnection.__connect_transport``; this class
    overrides that one method (by its mangled name, the only hook aio-pika 9-10 has per attempt) to try each
    node in turn. ``tests/unit/test_brokers.py`` fails if aio-pika renames it.
    """

    def __init__(self, urls: Sequence[str], **kwargs: Any) -> None:
        if not urls:
            raise ValueError("no node URLs")
        self.nodes = [URL(url) for url in urls]
        self.position = 0
        super().__init__(self.nodes[0], **kwargs)

    @property
    def node(self) -> str:
        """The node in use (or tried last), password masked: ``host:port``."""
        return f"{self.url.host}:{self.url.port}"

    async def _RobustConnection__connect_transport(self) -> None:
        failures: list[tuple[str, BaseException]] = []
        for _ in range(len(self.nodes)):
            tried = self.position
            self.url = self.nodes[tried]
            try:
                await RobustConnection._RobustConnection__connect_transport(self)  # type: ignore[attr-defined]
                return
            except CONNECTION_EXCEPTIONS as exc:
                failures.append((mask_url(str(self.url)), exc))
                # From the node tried, not from self.position: aio-pika also runs _on_connection_close for a
                # failed attempt, which has moved it on already (twice would skip a node, and with two nodes
                # retry the dead one for ever).
                self.position = (tried + 1) % len(self.nodes)
        if len(failures) == 1:
            raise failures[0][1]
        raise NodesUnreachable(failures)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        # The node we were on is the one most likely gone: start the next attempt with the one after it.
        if not self._close_called and not self.is_closed and len(self.nodes) > 1:
            self.position = (self.position + 1) % len(self.nodes)
        await super()._on_connection_close(closing)


assert hasattr(RobustConnection, "_RobustConnection__connect_transport"), "aio-pika changed its reconnect hook"


async def connect_robust(amqp_url: str, *, name: str, attempt_timeout: float, identity: str | None = None,
                         ) -> NodeListConnection:
    """A long-lived connection to one node of ``amqp_url`` that moves to another when it loses its node."""
    urls = node_urls(amqp_url)
    connection = NodeListConnection(
        rotation(urls, start_position(len(urls), identity)),
        client_properties={"connection_name": name},
        reconnect_interval=RECONNECT_INTERVAL,
    )
    await connection.connect(timeout=attempt_timeout)
    return connection


async def connect_once(amqp_url: str, *, attempt_timeout: float, identity: str | None = None) -> AbstractConnection:
    """A plain connection (no reconnecting) to the first node of ``amqp_url`` that answers, in rotation order."""
    urls = node_urls(amqp_url)
    failures: list[tuple[str, BaseException]] = []
    for url in rotation(urls, start_position(len(urls), identity)):
        try:
            return await asyncio.wait_for(aio_pika.connect(url), timeout=attempt_timeout)
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            failures.append((mask_url(url), exc))
    if len(failures) == 1:
        raise failures[0][1]
    raise NodesUnreachable(failures)


# ---- a channel that keeps refusing -------------------------------------------------------------------------

# At most one recycle per channel in this many seconds: a queue that really is full nacks every publish.
RECYCLE_INTERVAL: Final = 2.0


class ChannelRecycler:
    """Reopens a publishing channel that the broker keeps refusing for no reason of the queue's.

    Seen on RabbitMQ 3.10 (tests/test_high_availability.py): when a channel's first publish to a quorum queue
    comes while that queue's leader node is down, the broker nacks every later publish on that channel to that
    queue — for a minute and more, long after a new leader was elected — while a fresh channel gets confirms
    within seconds. So after a nack the queue is looked at (a passive declare: its message count): below its
    bound, the nack was not "queue full", and the underlying channel is closed; aio-pika's robust channel opens a
    new one (what it does after any channel error), and the next publish goes out on it.
    """

    def __init__(self) -> None:
        self._last = -RECYCLE_INTERVAL
        self._full = False

    async def after_nack(self, channel: AbstractChannel, queue: str, max_length: int) -> bool:
        """Call after a publish to ``queue`` was nacked; True when the queue is full (the nack's usual meaning).
        Within RECYCLE_INTERVAL of the last look, the last verdict stands."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._last < RECYCLE_INTERVAL:
            return self._full
        self._last = loop.time()
        self._full = False
        underlying = await channel.get_underlay_channel()
        try:
            declared = await underlying.queue_declare(queue, passive=True)
            self._full = (declared.message_count or 0) >= max_length
        except Exception:  # cannot look: reopening the channel is the safe side
            pass
        if self._full:
            return True
        log.warning("publishes to %s are refused though it is not full: reopening the channel", queue)
        with contextlib.suppress(Exception):
            await underlying.close()
        return False
