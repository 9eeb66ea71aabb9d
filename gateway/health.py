"""Health endpoints for orchestrators and load balancers.

``GET /healthz``  liveness: the process answers (no dependency is checked, so a broker outage never gets a
                  healthy gateway restarted).
``GET /readyz``   readiness: 200 while the gateway can accept writes — broker connection and channel usable
                  and not blocked by a memory or disk alarm, reply consumer running — else 503 naming the
                  failing part. The database is reported too, but
                  only as ``degraded``: while Postgres is away the gateway still accepts (202, applied later),
                  and a load balancer must not take every gateway out then.
"""

from __future__ import annotations

from aiohttp import web

from gateway import responses
from gateway.metrics import METRICS
from gateway.rpc import RPC
from gateway.state import TIMELINE


async def healthz(request: web.Request) -> web.Response:
    return responses.json_response({"success": True, "status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rpc, timeline = request.config_dict[RPC], request.config_dict[TIMELINE]
    checks = {
        "broker": ("blocked" if rpc.blocked else "ok") if rpc.available else "down",
        "replies": "ok" if rpc.replies_consuming else "down",
        "database": "ok" if timeline.database_reachable else "degraded",
        "clock": "synchronized" if timeline.synchronized else "unsynchronized",
    }
    failing = [name for name in ("broker", "replies") if checks[name] != "ok"]
    ready = not failing
    request.config_dict[METRICS].set_ready(ready)
    body: dict[str, object] = {"success": ready, "status": "ready" if ready else "not ready", "checks": checks}
    if failing:
        body["failing"] = failing
    return responses.json_response(body, status=200 if ready else 503)
