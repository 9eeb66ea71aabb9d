"""Least privilege in RabbitMQ: the permissions of each component's broker user, and RabbitMQ's password hash.

``amqp_permissions(prefix)`` gives the configure / write / read regexes of each component's user, as
``deploy/rabbitmq/definitions.json`` (written by ``make_definitions.py`` beside this file) and docs/security.md
give them. The PostgreSQL side is ``shared/roles.py``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class AmqpPermissions:
    """One user's permissions on the vhost: regexes over exchange and queue names (RabbitMQ anchors nothing)."""

    configure: str
    write: str
    read: str


def amqp_permissions(prefix: str = "crm") -> dict[str, AmqpPermissions]:
    """The permissions of each component's RabbitMQ user for AMQP_PREFIX ``prefix``.

    Why each part is there (shared/topology.py declares it all from every process):
    * ``configure`` = declare: the exchange, the shard queues, the dead-letter queue, the topology marker;
      the gateway also its exclusive reply queues ``<prefix>.reply.<id>``.
    * The marker is declared with ``alternate-exchange`` = ``shard-count=N,queue-type=T,dead=T``: creating it needs
      write on an exchange of that name and read on the marker.
    * A shard queue is declared with a dead-letter target (the default exchange, which permissions name
      ``amq.default``): whoever creates it first needs read on the queue and write on ``amq.default``. So
      every component may read the shard queues, though only the worker consumes them.
    * queue.bind needs write on the queue and read on the exchange (gateway and worker bind).
    * Publishing needs write on the exchange: the gateway and the replay tool publish to ``<prefix>.requests``,
      the worker to the default exchange (dead letters, replies).
    * Only the replay tool reads ``<prefix>.dead``.
    """
    p = re.escape(prefix)
    exchange, marker, dead = rf"{p}\.requests", rf"{p}\.topology", rf"{p}\.dead"
    shards, replies = rf"{p}\.shard\.\d+", rf"{p}\.reply\.\w+"
    marker_target, default_exchange = r"shard-count=\d+,queue-type=\w+(?:,dead=\w+)?", r"amq\.default"
    return {
        "gateway": AmqpPermissions(
            configure=_anchored(exchange, marker, dead, shards, replies),
            write=_anchored(exchange, shards, default_exchange, marker_target),
            read=_anchored(exchange, marker, shards, replies),
        ),
        "worker": AmqpPermissions(
            configure=_anchored(exchange, marker, dead, shards),
            write=_anchored(shards, default_exchange, marker_target),
            read=_anchored(exchange, marker, shards),
        ),
        "replay": AmqpPermissions(
            configure=_anchored(exchange, marker, dead, shards),
            write=_anchored(exchange, default_exchange, marker_target),
            read=_anchored(marker, dead, shards),
        ),
    }


def _anchored(*names: str) -> str:
    """One regex matching exactly these names (RabbitMQ would otherwise match any name containing one)."""
    return f"^({'|'.join(names)})$"


def rabbitmq_password_hash(password: str, *, salt: bytes | None = None) -> str:
    """A ``password_hash`` for a definitions file (``rabbit_password_hashing_sha256``, RabbitMQ's default):
    base64 of a 4-byte salt followed by SHA-256(salt + UTF-8 password)."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def rabbitmq_password_matches(password_hash: str, password: str) -> bool:
    raw = base64.b64decode(password_hash)
    return hmac.compare_digest(rabbitmq_password_hash(password, salt=raw[:4]), password_hash)
