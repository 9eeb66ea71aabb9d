"""What gateway and worker metrics have in common: the exposition and label guards (the clock's metrics are in
``shared.clock.metrics``).

Each process owns one ``CollectorRegistry`` (``gateway.metrics.GatewayMetrics`` / ``worker.metrics.WorkerMetrics``)
and never touches prometheus-client's global default registry, so two instances in one test process do not see
each other's values. Names follow the Prometheus/OpenTelemetry conventions: base units (seconds), ``_total`` on
counters, one ``crm_`` namespace.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import disable_created_metrics as _disable_created_metrics

# The ``*_created`` series double the size of every scrape and nothing here reads them.
_disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated

# Durations of an HTTP request or a database transaction: 1 ms to 30 s (RPC_TIMEOUT is 10 s by default).
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)
# Counts of requests per AMQP message or per transaction: powers of two up to the largest batch setting.
COUNT_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def bounded_label(value: str, allowed: frozenset[str], other: str = "other") -> str:
    """``value`` when it is one of ``allowed``, else ``other``: a label never takes unbounded values."""
    return value if value in allowed else other


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(registry)


def metrics_response(registry: CollectorRegistry) -> web.Response:
    """An aiohttp response carrying ``registry`` in the Prometheus text format."""
    # Set as a raw header: the content type carries a ``version`` parameter aiohttp's content_type= rejects.
    return web.Response(body=exposition(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


"""(offset of the database clock from the local wall clock, error bound), both in seconds."""
