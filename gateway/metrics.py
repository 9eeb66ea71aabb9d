"""The gateway's metrics: one registry per process, served at ``GET /metrics``.

Flow: the edge middleware (``gateway.middleware.edge``) times every request and counts it by route template,
method and final status; the handlers report the RPC outcome of each POST (``count_outcome``); the RPC client
reports each publish (``count_publish``, ``observe_pack``); the broker-connection code flips ``set_ready``.

Labels stay bounded: ``route`` is the route template (``/api/external/customers/{userId}``, never the path) or
``unmatched``; ``method`` is one of the HTTP methods or ``other``; outcomes and results are fixed lists, with
every series created at 0 so that ``rate()`` and alerts see them before the first event.
``key`` is the name of a configured API key (or ``anonymous`` when keys are off), set by ``gateway.middleware.auth`` and
``gateway.middleware.ratelimit``: bounded by the keys file, and never the key itself.
"""

from __future__ import annotations

from typing import Final, Literal

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.clock.metrics import ClockMetrics
from shared.envelope import OutcomeStatus
from shared.metrics import COUNT_BUCKETS, LATENCY_BUCKETS, bounded_label, metrics_response

# created/updated/superseded/phone_taken/idempotency_conflict/failed: the worker's answer; timeout: no answer
# within RPC_TIMEOUT (202); unavailable: not accepted (503).
RpcOutcome = OutcomeStatus | Literal["timeout", "unavailable"]
RPC_OUTCOMES: Final = frozenset(
    {"created", "updated", "superseded", "phone_taken", "idempotency_conflict", "failed", "timeout", "unavailable"}
)
PUBLISH_RESULTS: Final = frozenset({"confirmed", "failed"})
HTTP_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED: Final = "unmatched"
AuthFailure = Literal["missing", "invalid"]
AUTH_FAILURES: Final[tuple[AuthFailure, ...]] = ("missing", "invalid")
ANONYMOUS: Final = "anonymous"  # the key label of requests limited per client address (keys off)


class GatewayMetrics:
    """Every gateway metric, in a registry of its own (``self.registry``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "crm_gateway_http_requests",
            "HTTP requests answered, by route template, method and status code",
            ["route", "method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "crm_gateway_http_request_duration_seconds",
            "Time from receiving an HTTP request to its response being ready, by route template and method",
            ["route", "method"],
            unit="seconds",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "crm_gateway_http_requests_in_flight",
            "HTTP requests received and not answered yet",
            registry=registry,
        )
        self.outcomes = Counter(
            "crm_gateway_rpc_outcomes",
            "POSTs by outcome: the worker's answer, timeout (answered 202) or unavailable (answered 503)",
            ["outcome"],
            registry=registry,
        )
        self.publishes = Counter(
            "crm_gateway_publishes",
            "AMQP messages published to a shard queue, by result of the publisher confirm",
            ["result"],
            registry=registry,
        )
        self.pack_size = Histogram(
            "crm_gateway_pack_size",
            "Requests carried by one published AMQP message",
            buckets=COUNT_BUCKETS,
            registry=registry,
        )
        self.ready = Gauge(
            "crm_gateway_ready",
            "1 while the gateway can accept writes (broker connection, channel and reply consumer up), else 0",
            registry=registry,
        )
        # API keys and rate limits: the key label is a configured key NAME (bounded by the keys file), never a key.
        self.auth_failures = Counter(
            "crm_gateway_auth_failures",
            "Requests refused with 401 on a protected path: no key (missing) or a key not configured (invalid)",
            ["reason"],
            registry=registry,
        )
        self.authenticated = Counter(
            "crm_gateway_authenticated_requests",
            "Requests on a protected path carrying a configured API key, by key name",
            ["key"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "crm_gateway_rate_limited",
            "Requests refused with 429, by API key name (anonymous: keys off, limited per client address)",
            ["key"],
            registry=registry,
        )
        self.clock = ClockMetrics(registry)
        # Every outcome's and result's series exists from the start at 0 (rate() and alerts see it at once).
        self._outcome_children = {outcome: self.outcomes.labels(outcome) for outcome in sorted(RPC_OUTCOMES)}
        self._publish_children = {result: self.publishes.labels(result) for result in sorted(PUBLISH_RESULTS)}
        self._auth_failure_children = {reason: self.auth_failures.labels(reason) for reason in AUTH_FAILURES}
        self._key_children: dict[str, Counter] = {}
        self._limited_children: dict[str, Counter] = {}
        # Children looked up once per label set: the hot path then does a dict lookup, not labels().
        self._request_children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    # ---- helpers the code paths call ----------------------------------------------------------------

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One HTTP request answered with ``status`` after ``seconds``."""
        key = (route, bounded_label(method, HTTP_METHODS), str(status))
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(*key), self.duration.labels(route, key[1]))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def count_outcome(self, outcome: RpcOutcome) -> None:
        """The outcome of one POST: one of ``RPC_OUTCOMES``."""
        child = self._outcome_children.get(outcome)
        if child is None:
            raise ValueError(f"unknown RPC outcome {outcome!r}")
        child.inc()

    def count_auth_failure(self, reason: AuthFailure) -> None:
        """One request refused with 401: ``missing`` (no key sent) or ``invalid`` (not a configured key)."""
        self._auth_failure_children[reason].inc()

    def count_authenticated(self, key_name: str) -> None:
        child = self._key_children.get(key_name)
        if child is None:
            child = self._key_children[key_name] = self.authenticated.labels(key_name)
        child.inc()

    def count_rate_limited(self, key_name: str | None) -> None:
        """One request refused with 429; ``None``: no key (limited per client address), counted as anonymous."""
        label = key_name or ANONYMOUS
        child = self._limited_children.get(label)
        if child is None:
            child = self._limited_children[label] = self.rate_limited.labels(label)
        child.inc()

    def count_publish(self, confirmed: bool) -> None:
        """One AMQP message published: confirmed by the broker, or failed (nack, return, timeout, closed)."""
        self._publish_children["confirmed" if confirmed else "failed"].inc()

    def observe_pack(self, size: int) -> None:
        """One AMQP message carrying ``size`` requests was published."""
        self.pack_size.observe(size)

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)


METRICS = web.AppKey("metrics", GatewayMetrics)


def route_of(request: web.Request) -> str:
    """The route template the request matched, or ``unmatched`` (404, 405): never the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


async def metrics_handler(request: web.Request) -> web.Response:
    """``GET /metrics``: this gateway's registry in the Prometheus text format."""
    return metrics_response(request.app[METRICS].registry)
