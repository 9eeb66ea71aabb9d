"""The metric helpers move exactly the series they name, labels stay bounded, and /metrics serves the registry."""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import RPC_OUTCOMES, GatewayMetrics, metrics_handler
from shared.clock.metrics import ClockMetrics
from shared.metrics import exposition
from shared.settings import Settings
from tests.gateway_apps import edge_app
from worker.metrics import APPLIED_OUTCOMES, MetricsServer, WorkerMetrics, metrics_server

CUSTOMERS = "/api/external/customers"


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (yet)."""
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---- gateway helpers --------------------------------------------------------------------------------


def test_observe_request_counts_by_route_method_and_status_and_times_by_route_and_method() -> None:
    metrics = GatewayMetrics()
    metrics.observe_request(CUSTOMERS, "POST", 201, 0.003)
    metrics.observe_request(CUSTOMERS, "POST", 201, 0.2)
    metrics.observe_request(CUSTOMERS, "POST", 400, 0.001)
    reg = metrics.registry
    assert value(reg, "crm_gateway_http_requests_total", route=CUSTOMERS, method="POST", status="201") == 2
    assert value(reg, "crm_gateway_http_requests_total", route=CUSTOMERS, method="POST", status="400") == 1
    duration = "crm_gateway_http_request_duration_seconds"
    assert value(reg, f"{duration}_count", route=CUSTOMERS, method="POST") == 3
    assert value(reg, f"{duration}_bucket", route=CUSTOMERS, method="POST", le="0.005") == 2
    assert value(reg, f"{duration}_sum", route=CUSTOMERS, method="POST") == pytest.approx(0.204)


def test_unknown_http_methods_share_one_label_value() -> None:
    metrics = GatewayMetrics()
    metrics.observe_request("unmatched", "BREW", 405, 0.001)
    metrics.observe_request("unmatched", "PROPFIND", 405, 0.001)
    assert value(metrics.registry, "crm_gateway_http_requests_total", route="unmatched", method="other",
                 status="405") == 2


def test_every_rpc_outcome_exists_at_zero_and_counts_one_by_one() -> None:
    metrics = GatewayMetrics()
    for outcome in RPC_OUTCOMES:
        assert metrics.registry.get_sample_value("crm_gateway_rpc_outcomes_total", {"outcome": outcome}) == 0
    metrics.count_outcome("created")
    metrics.count_outcome("created")
    metrics.count_outcome("timeout")
    assert value(metrics.registry, "crm_gateway_rpc_outcomes_total", outcome="created") == 2
    assert value(metrics.registry, "crm_gateway_rpc_outcomes_total", outcome="timeout") == 1
    assert value(metrics.registry, "crm_gateway_rpc_outcomes_total", outcome="updated") == 0


def test_an_unknown_rpc_outcome_is_a_bug_not_a_new_series() -> None:
    with pytest.raises(ValueError, match="unknown RPC outcome"):
        bogus: Any = "maybe"  # mypy already refuses it; a caller outside type checking gets an error
        GatewayMetrics().count_outcome(bogus)


def test_publishes_by_result_and_pack_sizes() -> None:
    metrics = GatewayMetrics()
    metrics.count_publish(confirmed=True)
    metrics.count_publish(confirmed=True)
    metrics.count_publish(confirmed=False)
    metrics.observe_pack(1)
    metrics.observe_pack(40)
    reg = metrics.registry
    assert value(reg, "crm_gateway_publishes_total", result="confirmed") == 2
    assert value(reg, "crm_gateway_publishes_total", result="failed") == 1
    assert value(reg, "crm_gateway_pack_size_count") == 2
    assert value(reg, "crm_gateway_pack_size_sum") == 41
    assert value(reg, "crm_gateway_pack_size_bucket", le="32.0") == 1


def test_ready_gauge_follows_set_ready() -> None:
    metrics = GatewayMetrics()
    assert value(metrics.registry, "crm_gateway_ready") == 0
    metrics.set_ready(True)
    assert value(metrics.registry, "crm_gateway_ready") == 1
    metrics.set_ready(False)
    assert value(metrics.registry, "crm_gateway_ready") == 0


def test_each_instance_has_its_own_registry_and_the_global_one_stays_empty() -> None:
    first, second = GatewayMetrics(), GatewayMetrics()
    first.count_outcome("created")
    assert value(second.registry, "crm_gateway_rpc_outcomes_total", outcome="created") == 0
    WorkerMetrics().count_applied("created")
    assert REGISTRY.get_sample_value("crm_gateway_rpc_outcomes_total", {"outcome": "created"}) is None
    assert REGISTRY.get_sample_value("crm_worker_requests_applied_total", {"outcome": "created"}) is None


# ---- gateway middleware and /metrics ------------------------------------------------------------------


@pytest.fixture
async def gateway_client() -> AsyncIterator[tuple[TestClient[web.Request, web.Application], GatewayMetrics]]:
    async def customer(request: web.Request) -> web.Response:
        return web.json_response({"userId": request.match_info["user_id"]})

    async def gone(request: web.Request) -> web.Response:
        raise web.HTTPServiceUnavailable()

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("bug")

    metrics = GatewayMetrics()
    app = edge_app(metrics=metrics)
    app.router.add_get(CUSTOMERS + "/{user_id}", customer)
    app.router.add_post("/gone", gone)
    app.router.add_post("/broken", broken)
    app.router.add_get("/metrics", metrics_handler)
    async with TestClient(TestServer(app)) as client:
        yield client, metrics


async def test_middleware_labels_requests_with_the_route_template_never_the_path(
    gateway_client: tuple[TestClient[web.Request, web.Application], GatewayMetrics],
) -> None:
    client, metrics = gateway_client
    for user in ("u1", "u2", "u3"):
        assert (await client.get(f"{CUSTOMERS}/{user}")).status == 200
    template = CUSTOMERS + "/{user_id}"
    assert value(metrics.registry, "crm_gateway_http_requests_total", route=template, method="GET",
                 status="200") == 3
    assert value(metrics.registry, "crm_gateway_http_request_duration_seconds_count", route=template,
                 method="GET") == 3
    exposed = exposition(metrics.registry).decode()
    assert "u1" not in exposed and "u2" not in exposed


async def test_middleware_counts_404_as_unmatched_and_http_errors_and_crashes_by_status(
    gateway_client: tuple[TestClient[web.Request, web.Application], GatewayMetrics],
) -> None:
    client, metrics = gateway_client
    assert (await client.get("/no/such/path")).status == 404
    assert (await client.post("/gone")).status == 503
    assert (await client.post("/broken")).status == 500
    reg = metrics.registry
    assert value(reg, "crm_gateway_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value(reg, "crm_gateway_http_requests_total", route="/gone", method="POST", status="503") == 1
    assert value(reg, "crm_gateway_http_requests_total", route="/broken", method="POST", status="500") == 1
    assert value(reg, "crm_gateway_http_requests_in_flight") == 0


async def test_metrics_endpoint_serves_the_text_format_of_this_registry(
    gateway_client: tuple[TestClient[web.Request, web.Application], GatewayMetrics],
) -> None:
    client, metrics = gateway_client
    metrics.count_outcome("phone_taken")
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(await response.text())}
    outcomes = families["crm_gateway_rpc_outcomes"]
    assert outcomes.type == "counter" and outcomes.documentation
    phone_taken = [s for s in outcomes.samples if s.labels == {"outcome": "phone_taken"}]
    assert [s.value for s in phone_taken] == [1.0]
    assert not any(name.endswith("_created") for family in families.values() for name in
                   (s.name for s in family.samples)), "the *_created series should be off"


# ---- worker helpers and server ------------------------------------------------------------------------


def test_observe_batch_feeds_size_and_duration_histograms() -> None:
    metrics = WorkerMetrics()
    metrics.observe_batch(1, 0.002)
    metrics.observe_batch(300, 0.08)
    reg = metrics.registry
    assert value(reg, "crm_worker_batch_size_count") == 2
    assert value(reg, "crm_worker_batch_size_sum") == 301
    assert value(reg, "crm_worker_batch_size_bucket", le="256.0") == 1
    assert value(reg, "crm_worker_batch_apply_duration_seconds_count") == 2
    assert value(reg, "crm_worker_batch_apply_duration_seconds_bucket", le="0.0025") == 1


def test_count_applied_by_outcome_with_every_outcome_at_zero_first() -> None:
    metrics = WorkerMetrics()
    for outcome in APPLIED_OUTCOMES:
        assert metrics.registry.get_sample_value("crm_worker_requests_applied_total", {"outcome": outcome}) == 0
    metrics.count_applied("created", 5)
    metrics.count_applied("duplicate")
    assert value(metrics.registry, "crm_worker_requests_applied_total", outcome="created") == 5
    assert value(metrics.registry, "crm_worker_requests_applied_total", outcome="duplicate") == 1
    with pytest.raises(ValueError, match="unknown applied outcome"):
        bogus: Any = "timeout"
        metrics.count_applied(bogus)


def test_worker_counters_move_by_the_counts_given() -> None:
    metrics = WorkerMetrics()
    metrics.count_transient_retry()
    metrics.count_transient_retry(3)
    metrics.count_dead_lettered()
    metrics.count_redelivery_deduplicated(2)
    metrics.count_future_stamp()
    reg = metrics.registry
    assert value(reg, "crm_worker_transient_retries_total") == 4
    assert value(reg, "crm_worker_dead_lettered_total") == 1
    assert value(reg, "crm_worker_redeliveries_deduplicated_total") == 2
    assert value(reg, "crm_worker_future_stamps_total") == 1


async def test_metrics_server_serves_until_stopped() -> None:
    metrics = WorkerMetrics()
    metrics.count_applied("updated", 7)
    port = free_port()
    server = MetricsServer(metrics.registry, "127.0.0.1", port)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    finally:
        await server.stop()
    assert 'crm_worker_requests_applied_total{outcome="updated"} 7.0' in text
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


async def test_metrics_server_on_a_taken_port_fails_to_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = MetricsServer(WorkerMetrics().registry, "127.0.0.1", taken.getsockname()[1])
        with pytest.raises(OSError):
            await server.start()
        await server.stop()  # nothing to stop: no error


def test_metrics_port_zero_means_no_server() -> None:
    metrics = WorkerMetrics()
    settings = Settings()
    server = metrics_server(settings, metrics)
    assert server is not None and server.port == getattr(settings, "metrics_port", 9100)
    assert metrics_server(settings.model_copy(update={"metrics_port": 0}), metrics) is None


# ---- clock ---------------------------------------------------------------------------------------------


def test_clock_metrics_start_unsynchronized_and_take_each_estimate() -> None:
    registry = CollectorRegistry()
    clock = ClockMetrics(registry)
    assert value(registry, "crm_clock_synchronized") == 0
    clock.observe(offset_seconds=-0.25, error_bound_seconds=0.0004)
    assert value(registry, "crm_clock_synchronized") == 1
    assert value(registry, "crm_clock_offset_seconds") == -0.25
    assert value(registry, "crm_clock_error_bound_seconds") == 0.0004
    clock.count_step()
    assert value(registry, "crm_clock_step_events_total") == 1


def test_clock_metrics_can_read_the_estimate_at_scrape_time() -> None:
    registry = CollectorRegistry()
    clock = ClockMetrics(registry)
    reading: list[tuple[float, float] | None] = [None]
    steps = [0]
    clock.follow(lambda: reading[0], steps=lambda: steps[0])
    assert value(registry, "crm_clock_synchronized") == 0
    assert math.isnan(value(registry, "crm_clock_offset_seconds"))
    reading[0] = (1.5, 0.002)
    steps[0] = 2
    assert value(registry, "crm_clock_synchronized") == 1
    assert value(registry, "crm_clock_offset_seconds") == 1.5
    assert value(registry, "crm_clock_error_bound_seconds") == 0.002
    assert value(registry, "crm_clock_step_events_total") == 2
