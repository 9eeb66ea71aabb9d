"""Make sure PostgreSQL and RabbitMQ answer at DATABASE_URL / AMQP_URL before the tests run.

If either is unreachable and Docker is available, start them with ``docker compose up -d`` and wait.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse

SERVICES = {
    "postgres": (os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"), 5432),
    "rabbitmq": (os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"), 5672),
}


def reachable(url: str, default_port: int) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def main() -> int:
    missing = [name for name, (url, port) in SERVICES.items() if not reachable(url, port)]
    if not missing:
        print("services reachable: postgres, rabbitmq")
        return 0
    if shutil.which("docker") is None:
        print(f"unreachable: {', '.join(missing)}; set DATABASE_URL/AMQP_URL or install Docker", file=sys.stderr)
        return 1
    print(f"starting {', '.join(missing)} with docker compose")
    subprocess.run(["docker", "compose", "up", "-d", "--wait", *missing], check=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if all(reachable(url, port) for url, port in SERVICES.values()):
            return 0
        time.sleep(1)
    print("services did not become reachable in 120s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
