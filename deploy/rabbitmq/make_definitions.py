"""Write a RabbitMQ definitions file: one user per component, with the permissions of ``shared.roles``.

    python deploy/rabbitmq/make_definitions.py > deploy/rabbitmq/definitions.json

Passwords come from the environment, never the command line (which other users can see in ``ps``):
CRM_GATEWAY_AMQP_PASSWORD, CRM_WORKER_AMQP_PASSWORD, CRM_REPLAY_AMQP_PASSWORD; unset, the development ones
(``crm_<component>_dev``, what docker-compose.yml uses). Only salted hashes are written (RabbitMQ's default
``rabbit_password_hashing_sha256``). ``AMQP_PREFIX`` (default crm) and ``AMQP_VHOST`` (default /) name the
topology; ``KEEP_GUEST=false`` leaves out the development ``guest`` administrator.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deploy.rabbitmq.permissions import amqp_permissions, rabbitmq_password_hash
from shared.roles import COMPONENTS

HASHING = "rabbit_password_hashing_sha256"


def definitions(prefix: str, vhost: str, passwords: dict[str, str], keep_guest: bool) -> dict[str, Any]:
    users: list[dict[str, Any]] = []
    permissions: list[dict[str, str]] = []
    if keep_guest:  # development only: the test suite and the management UI log in as guest/guest
        users.append({"name": "guest", "password_hash": rabbitmq_password_hash("guest"),
                      "hashing_algorithm": HASHING, "tags": ["administrator"], "limits": {}})
        permissions.append({"user": "guest", "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"})
    for component, allowed in amqp_permissions(prefix).items():
        user = f"{prefix}_{component}"
        users.append({"name": user, "password_hash": rabbitmq_password_hash(passwords[component]),
                      "hashing_algorithm": HASHING, "tags": [], "limits": {}})
        permissions.append({"user": user, "vhost": vhost, "configure": allowed.configure, "write": allowed.write,
                            "read": allowed.read})
    return {"users": users, "vhosts": [{"name": vhost}], "permissions": permissions, "topic_permissions": [],
            "parameters": [], "global_parameters": [], "policies": [], "queues": [], "exchanges": [],
            "bindings": []}


def main() -> None:
    prefix = os.environ.get("AMQP_PREFIX", "crm")
    passwords = {component: os.environ.get(f"CRM_{component.upper()}_AMQP_PASSWORD") or f"crm_{component}_dev"
                 for component in COMPONENTS}
    document = definitions(prefix, os.environ.get("AMQP_VHOST", "/"), passwords,
                           os.environ.get("KEEP_GUEST", "true").lower() != "false")
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
