"""Enable RabbitMQ's own Prometheus plugin on the local node, so queue depth and consumers can be scraped.

Called by ``make services`` after the broker is reachable. Idempotent (nothing is done when the plugin is already
enabled) and quiet where there is nothing to do: without ``rabbitmq-plugins`` on this machine the broker runs
elsewhere (the compose image enables the plugin itself). Never fails the build: the plugin serves metrics only,
and the tests that read it fall back to a list of its names when it does not answer.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

PLUGIN = "rabbitmq_prometheus"


def main() -> int:
    tool = shutil.which("rabbitmq-plugins")
    if tool is None:
        return 0
    try:
        enabled = subprocess.run([tool, "-q", "is_enabled", PLUGIN], capture_output=True, text=True, timeout=60)
        if enabled.returncode == 0:
            return 0
        done = subprocess.run([tool, "-q", "enable", PLUGIN], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"{PLUGIN} not enabled: {exc}", file=sys.stderr)
        return 0
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        print(f"{PLUGIN} not enabled: {reason[-1] if reason else 'rabbitmq-plugins failed'}", file=sys.stderr)
        return 0
    print(f"enabled {PLUGIN} (metrics on port 15692)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
