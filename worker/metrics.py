"""The worker's metrics: one registry per process, served by its own small HTTP server on METRICS_PORT.

Flow: the consumer reports each applied batch (``observe_batch``) and the outcome of each request in it
(``count_applied``), each transient retry, dead letter, deduplicated redelivery and future stamp; the clock
code reports its estimate through ``clock``. ``MetricsServer`` serves ``GET /metrics`` from start-up to
shutdown (started before consuming, stopped after the drain, so the last scrape still sees the drain's work).

Every worker replica serves its own numbers; Prometheus finds each replica by DNS (``monitoring/prometheus.yml``)
and sums them.

The port: METRICS_PORT when it is set (taken: start-up fails; 0: no server). Unset, it is 9100 or, when that
is taken, the next free one of the ``PORTS_TRIED`` from 9100 up, logged: so several workers on one machine,
each started the README's way (``make run-worker``, no METRICS_PORT), all run. Compose sets METRICS_PORT=9100.
"""

from __future__ import annotations

import errno
import logging
from typing import Final, Literal

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from shared.clock.metrics import ClockMetrics
from shared.metrics import COUNT_BUCKETS, LATENCY_BUCKETS, metrics_response
from shared.settings import Settings

log = logging.getLogger("worker.metrics")

DEFAULT_PORT: Final = 9100
PORTS_TRIED: Final = 100  # METRICS_PORT unset: 9100..9199, the first free one
# created/updated: the row was written; superseded: an older stamp than the stored row's (nothing written);
# phone_taken / idempotency_conflict: business refusals; duplicate: the request id was already processed.
AppliedOutcome = Literal["created", "updated", "superseded", "phone_taken", "idempotency_conflict", "duplicate"]
APPLIED_OUTCOMES: Final = frozenset(
    {"created", "updated", "superseded", "phone_taken", "idempotency_conflict", "duplicate"}
)


class WorkerMetrics:
    """Every worker metric, in a registry of its own (``self.registry``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.applied = Counter(
            "crm_worker_requests_applied",
            "Requests settled by this worker, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "crm_worker_batch_size",
            "Requests applied in one database transaction",
            buckets=COUNT_BUCKETS,
            registry=registry,
        )
        self.batch_duration = Histogram(
            "crm_worker_batch_apply_duration_seconds",
            "Time to apply one batch in the database, transaction included",
            unit="seconds",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.transient_retries = Counter(
            "crm_worker_transient_retries",
            "Requests put back for another try after a retryable error (database or broker away)",
            registry=registry,
        )
        self.dead_lettered = Counter(
            "crm_worker_dead_lettered",
            "Requests moved to the dead-letter queue",
            registry=registry,
        )
        self.redeliveries_deduplicated = Counter(
            "crm_worker_redeliveries_deduplicated",
            "Redelivered requests recognised as already processed and answered from the record",
            registry=registry,
        )
        self.future_stamps = Counter(
            "crm_worker_future_stamps",
            "Requests stamped further in the future than CLOCK_SKEW_BOUND_MS",
            registry=registry,
        )
        self.clock = ClockMetrics(registry)
        # Every outcome's series exists from the start at 0 (rate() and alerts see it before the first event).
        self._applied_children = {outcome: self.applied.labels(outcome) for outcome in APPLIED_OUTCOMES}

    # ---- helpers the code paths call ----------------------------------------------------------------

    def observe_batch(self, size: int, seconds: float) -> None:
        """One batch of ``size`` requests applied in one transaction taking ``seconds``."""
        self.batch_size.observe(size)
        self.batch_duration.observe(seconds)

    def count_applied(self, outcome: AppliedOutcome, count: int = 1) -> None:
        """``count`` requests settled with ``outcome`` (one of ``APPLIED_OUTCOMES``)."""
        child = self._applied_children.get(outcome)
        if child is None:
            raise ValueError(f"unknown applied outcome {outcome!r}")
        child.inc(count)

    def count_transient_retry(self, count: int = 1) -> None:
        self.transient_retries.inc(count)

    def count_dead_lettered(self, count: int = 1) -> None:
        self.dead_lettered.inc(count)

    def count_redelivery_deduplicated(self, count: int = 1) -> None:
        self.redeliveries_deduplicated.inc(count)

    def count_future_stamp(self, count: int = 1) -> None:
        self.future_stamps.inc(count)


class MetricsServer:
    """``GET /metrics`` on ``host:port`` for one registry; ``start()`` and ``stop()`` are explicit."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, tries: int = 1) -> None:
        self.registry = registry
        self.host = host
        self.port = port  # once started: the port listened on
        self.tries = tries  # ports tried in turn from ``port`` while they are taken
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    async def _serve(self, request: web.Request) -> web.Response:
        return metrics_response(self.registry)

    async def start(self) -> None:
        """Listen; raises OSError when every port tried is taken (a start-up failure like an unreachable
        broker, naming the first)."""
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = await self._listen(runner)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._site = runner, site
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def _listen(self, runner: web.AppRunner) -> web.TCPSite:
        first_error: OSError | None = None
        for port in range(self.port, min(self.port + self.tries, 65536)):
            site = web.TCPSite(runner, self.host, port)
            try:
                await site.start()
            except OSError as exc:
                await site.stop()  # unregistered from the runner: it never listened
                if exc.errno != errno.EADDRINUSE:
                    raise
                first_error = first_error or exc
                continue
            if port != self.port:
                log.info("port %d (the default METRICS_PORT) is taken: using %d", self.port, port)
                self.port = port
            return site
        assert first_error is not None
        raise first_error

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = self._site = None


def metrics_server(settings: Settings, metrics: WorkerMetrics) -> MetricsServer | None:
    """The server for ``settings``' METRICS_PORT, or None when it is 0 (metrics off); when METRICS_PORT is
    not set, one that moves up from the default past taken ports."""
    port = settings.metrics_port
    if port == 0:
        return None
    chosen = "metrics_port" in settings.model_fields_set  # set in the environment (compose: 9100, strictly)
    return MetricsServer(metrics.registry, settings.host, port, tries=1 if chosen else PORTS_TRIED)
