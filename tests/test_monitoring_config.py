"""The monitoring profile holds together: rules, scrape config, dashboard and compose file agree with the code.

Drift checks: every metric name the alert rules and the dashboard query exists in the gateway's or the worker's
registry or in RabbitMQ's rabbitmq_prometheus plugin (scraped live from the local broker when it answers, else
the list below); every scrape target is a compose service with that port; Grafana's provisioning points at files
that exist and at the datasource the dashboard uses. promtool (Debian package ``prometheus``) checks the rules,
runs their unit tests and parses every dashboard query.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.metrics import GatewayMetrics
from shared.settings import Settings
from worker.metrics import DEFAULT_PORT, WorkerMetrics

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
ALERTS_YML = MONITORING / "alerts.yml"
DASHBOARDS = MONITORING / "grafana" / "dashboards"
PROVISIONING = MONITORING / "grafana" / "provisioning"
PLUGIN_PORT = 15692

# Names of rabbitmq_prometheus that the rules and the dashboard may use when no local broker answers. Present
# in RabbitMQ 3.10 through 4.x; test_plugin_name_list_matches_the_live_broker keeps this list honest.
RABBITMQ_PLUGIN_NAMES = frozenset({
    "rabbitmq_detailed_queue_messages",
    "rabbitmq_detailed_queue_messages_ready",
    "rabbitmq_detailed_queue_messages_unacked",
    "rabbitmq_detailed_queue_process_reductions_total",
    "rabbitmq_detailed_queue_consumers",
    "rabbitmq_build_info",
    "rabbitmq_identity_info",
})
# Series Prometheus itself adds to every target.
PROMETHEUS_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

ALERTS_REQUIRED = {
    "CrmDeadLettersPresent",
    "CrmGateway5xxRateHigh",
    "CrmGateway202RateHigh",
    "CrmShardQueueGrowing",
    "CrmShardQueueWithoutConsumer",
    "CrmGatewayNotReady",
    "CrmScrapeTargetDown",
}


# ---- helpers ---------------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    data = load_yaml(PROMETHEUS_YML)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def dashboards() -> list[dict[str, Any]]:
    found = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(DASHBOARDS.glob("*.json"))]
    assert found, f"no dashboard JSON in {DASHBOARDS}"
    return found


def promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    return tool


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, check=False)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]]


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def dashboard_exprs(dashboards: list[dict[str, Any]]) -> list[str]:
    return [target["expr"] for board in dashboards for panel in panels(board) for target in panel.get("targets", [])
            if target.get("expr")]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(str(item).partition("=")[::2] for item in env)
    return {str(key): str(value) for key, value in env.items()}


def container_ports(name: str, service: dict[str, Any]) -> set[int]:
    """Ports a service listens on inside the compose network: published, exposed, or its app's settings."""
    ports = {int(str(port).split("/")[0]) for port in service.get("expose", [])}
    for entry in service.get("ports", []):
        ports.add(int(entry["target"]) if isinstance(entry, dict) else int(str(entry).split("/")[0].rpartition(":")[2]))
    env = environment(service)
    if name == "gateway":
        ports.add(int(env.get("PORT", Settings.model_fields["port"].default)))
    if name == "worker":
        ports.add(int(env.get("METRICS_PORT", DEFAULT_PORT)))
    return ports


def bind_mounts(service: dict[str, Any]) -> dict[str, tuple[Path, bool]]:
    """{container path: (host path, read-only)} for the service's bind mounts (host paths starting with ./)."""
    mounts: dict[str, tuple[Path, bool]] = {}
    for volume in service.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        target, _, mode = rest.partition(":")
        if source.startswith("./"):
            mounts[target] = (ROOT / source, "ro" in mode.split(","))
    return mounts


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The repository file a container path of ``service`` resolves to through its bind mounts."""
    wanted = PurePosixPath(container_path)
    for target, (source, _) in bind_mounts(service).items():
        mount = PurePosixPath(target)
        if wanted == mount or mount in wanted.parents:
            return source.joinpath(*wanted.relative_to(mount).parts)
    return None


# ---- PromQL: the metric names an expression reads ---------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKEN = re.compile(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                       "group_right", "inf", "nan", "Inf", "NaN"})


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, labels or durations."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors and subqueries, Grafana's $__rate_interval
    text = _GROUPING.sub("", text)
    return {match[1] for match in _TOKEN.finditer(text) if not match[2] and match[1] not in _KEYWORDS}


def test_metric_names_are_read_from_promql() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(foo_seconds_bucket{route!~"/x|y", a=`b`}'
            '[$__rate_interval]))) / on(job) group_left(instance) bar_total offset 5m > bool 1e3 '
            'and max without (pod) (baz) or vector(0)')
    assert metric_names(expr) == {"foo_seconds_bucket", "bar_total", "baz"}


# ---- exposed names -------------------------------------------------------------------------------------


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """The sample names a registry exposes, whether or not a labelled series exists yet."""
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def plugin_endpoints(prometheus_config: dict[str, Any]) -> list[str]:
    """The local broker's URLs for every scrape job aimed at the plugin's port, with that job's path and params."""
    urls = []
    for job in prometheus_config["scrape_configs"]:
        targets = [t for static in job.get("static_configs", []) for t in static.get("targets", [])]
        if any(t.endswith(f":{PLUGIN_PORT}") for t in targets):
            query = urllib.parse.urlencode(job.get("params", {}), doseq=True)
            path = job.get("metrics_path", "/metrics")
            urls.append(f"http://127.0.0.1:{PLUGIN_PORT}{path}" + (f"?{query}" if query else ""))
    return urls


def scrape_names(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode("utf-8")
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def live_plugin_names(prometheus_config: dict[str, Any]) -> set[str] | None:
    """Names from the local broker's plugin, scraped the way Prometheus does; None when it does not answer."""
    names: set[str] = set()
    try:
        for url in plugin_endpoints(prometheus_config):
            names |= scrape_names(url)
    except (urllib.error.URLError, OSError):
        return None
    return names


@pytest.fixture(scope="module")
def known_names(live_plugin_names: set[str] | None) -> set[str]:
    plugin = live_plugin_names if live_plugin_names is not None else set(RABBITMQ_PLUGIN_NAMES)
    return (exposed_names(GatewayMetrics().registry) | exposed_names(WorkerMetrics().registry) | plugin
            | PROMETHEUS_SYNTHETIC)


# ---- promtool --------------------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    result = run_promtool("check", "rules", str(ALERTS_YML))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = run_promtool("test", "rules", str(MONITORING / "alerts.test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_passes_promtool_check() -> None:
    result = run_promtool("check", "config", str(PROMETHEUS_YML))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_query_is_valid_promql(dashboards: list[dict[str, Any]], tmp_path: Path) -> None:
    """promtool parses each query as a recording rule (Grafana's interval variables replaced by a duration)."""
    rules = [{"record": f"dashboard:query_{n}", "expr": re.sub(r"\$__\w+", "1m", expr)}
             for n, expr in enumerate(dashboard_exprs(dashboards))]
    assert rules
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# ---- alert rules -----------------------------------------------------------------------------------------


def test_the_required_alerts_exist() -> None:
    missing = ALERTS_REQUIRED - {rule.get("alert") for rule in alert_rules()}
    assert not missing, f"missing alerts: {sorted(missing)}"


def test_every_alert_waits_has_a_severity_and_says_what_to_do() -> None:
    for rule in alert_rules():
        assert rule.get("for"), f"{rule['alert']} fires on a single evaluation"
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, rule["alert"]
        assert rule.get("annotations", {}).get("summary"), rule["alert"]
        assert rule.get("annotations", {}).get("description"), rule["alert"]


def test_queue_growth_alert_waits_five_minutes() -> None:
    rule = next(rule for rule in alert_rules() if rule["alert"] == "CrmShardQueueGrowing")
    assert rule["for"] == "5m" and "[5m]" in rule["expr"]


# ---- drift: every queried metric exists --------------------------------------------------------------------


def test_every_metric_the_alert_rules_read_exists(known_names: set[str]) -> None:
    used = {name for rule in alert_rules() for name in metric_names(rule["expr"])}
    assert used, "no metric names found in the rules"
    assert not used - known_names, f"rules read metrics nobody exports: {sorted(used - known_names)}"


def test_every_metric_the_dashboard_reads_exists(dashboards: list[dict[str, Any]], known_names: set[str]) -> None:
    used = {name for expr in dashboard_exprs(dashboards) for name in metric_names(expr)}
    assert used, "no metric names found in the dashboard"
    assert not used - known_names, f"dashboard reads metrics nobody exports: {sorted(used - known_names)}"


def test_plugin_name_list_matches_the_live_broker(live_plugin_names: set[str] | None) -> None:
    if live_plugin_names is None:
        pytest.skip(f"no rabbitmq_prometheus on 127.0.0.1:{PLUGIN_PORT} (`make services` enables it)")
    assert not RABBITMQ_PLUGIN_NAMES - live_plugin_names, sorted(RABBITMQ_PLUGIN_NAMES - live_plugin_names)


def test_dashboard_shows_what_operators_scale_on(dashboards: list[dict[str, Any]]) -> None:
    used = {name for expr in dashboard_exprs(dashboards) for name in metric_names(expr)}
    wanted = {
        "crm_gateway_http_requests_total",  # request rate by status, 202 and 5xx rates
        "crm_gateway_http_request_duration_seconds_bucket",  # p50 / p99
        "rabbitmq_detailed_queue_messages",  # queue depth, dead letters
        "rabbitmq_detailed_queue_consumers",
        "crm_worker_batch_size_bucket",
        "crm_worker_batch_apply_duration_seconds_bucket",
        "up",  # live workers
        "crm_clock_error_bound_seconds",
    }
    assert not wanted - used, f"dashboard lacks {sorted(wanted - used)}"


# ---- scrape targets are compose services -----------------------------------------------------------------


def test_every_static_scrape_target_is_a_compose_service_port(
    prometheus_config: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    assert {"gateway", "worker", "rabbitmq", "prometheus"} <= jobs.keys()
    for job in jobs.values():
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                name = "prometheus" if host == "localhost" else host  # Prometheus scraping itself
                assert name in services, f"job {job['job_name']}: {host} is not a compose service"
                assert int(port) in container_ports(name, services[name]), (
                    f"job {job['job_name']}: {name} does not listen on {port}")


def test_every_worker_replica_is_found_by_dns(
    prometheus_config: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    job = next(job for job in prometheus_config["scrape_configs"] if job["job_name"] == "worker")
    assert not job.get("static_configs"), "a static worker target misses replicas of --scale worker=N"
    (sd,) = job["dns_sd_configs"]
    assert sd.get("type", "SRV") == "A" and sd["names"] == ["worker"]
    worker = services["worker"]
    assert environment(worker).get("METRICS_PORT") == str(sd["port"])
    assert sd["port"] in container_ports("worker", worker)


def test_per_queue_metrics_are_scraped_from_the_detailed_endpoint(prometheus_config: dict[str, Any]) -> None:
    job = next(job for job in prometheus_config["scrape_configs"] if job.get("metrics_path") == "/metrics/detailed")
    assert set(job["params"]["family"]) >= {"queue_coarse_metrics", "queue_consumer_count"}


def test_rabbitmq_image_ships_the_prometheus_plugin_on_an_internal_port(services: dict[str, dict[str, Any]]) -> None:
    rabbitmq = services["rabbitmq"]
    # The official image enables rabbitmq_prometheus itself (docker-library/rabbitmq, since 3.8).
    assert re.fullmatch(r"rabbitmq:3\.(1[0-9])(\.\d+)?-management|rabbitmq:4(\.\d+)*-management",
                        str(rabbitmq["image"])), rabbitmq["image"]
    assert PLUGIN_PORT in container_ports("rabbitmq", rabbitmq)
    published = [str(port) for port in rabbitmq.get("ports", []) if str(PLUGIN_PORT) in str(port)]
    assert not published, "the plugin has no authentication: keep it off the host"


# ---- the monitoring profile ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prometheus", "grafana"])
def test_monitoring_services_are_in_the_profile_pinned_and_healthchecked(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    assert service.get("profiles") == ["monitoring"]
    assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", str(service["image"])), f"{name} image not pinned"
    check = service.get("healthcheck", {})
    assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
    for port in service.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"{name} published beyond localhost: {port}"


def test_app_services_stay_outside_the_monitoring_profile(services: dict[str, dict[str, Any]]) -> None:
    for name in ("postgres", "rabbitmq", "migrate", "gateway", "worker"):
        assert "profiles" not in services[name], name


@pytest.mark.parametrize("name", ["prometheus", "grafana"])
def test_monitoring_bind_mounts_exist_and_are_read_only(services: dict[str, dict[str, Any]], name: str) -> None:
    mounts = bind_mounts(services[name])
    assert mounts, f"{name} mounts nothing from monitoring/"
    for target, (source, read_only) in mounts.items():
        assert source.exists(), f"{name}: {source} (for {target}) is missing"
        assert read_only, f"{name}: {target} is mounted writable"


def test_prometheus_loads_this_config_and_its_rule_files(
    services: dict[str, dict[str, Any]], prometheus_config: dict[str, Any]
) -> None:
    prometheus = services["prometheus"]
    flags = dict(str(arg).partition("=")[::2] for arg in prometheus.get("command", []))
    config_path = flags.get("--config.file", "/etc/prometheus/prometheus.yml")
    assert host_path(prometheus, config_path) == PROMETHEUS_YML
    for rule_file in prometheus_config["rule_files"]:
        in_container = PurePosixPath(config_path).parent / rule_file
        local = host_path(prometheus, str(in_container))
        assert local is not None and local.exists(), f"rule file {in_container} is not mounted"
        assert local == ALERTS_YML


def test_grafana_provisioning_points_at_shipped_files(
    services: dict[str, dict[str, Any]], dashboards: list[dict[str, Any]]
) -> None:
    grafana = services["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning == PROVISIONING

    providers = [p for path in (PROVISIONING / "dashboards").glob("*.yml") for p in load_yaml(path)["providers"]]
    assert providers
    for provider in providers:
        folder = host_path(grafana, provider["options"]["path"])
        assert folder == DASHBOARDS and any(folder.glob("*.json")), provider["options"]["path"]

    home = environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        local = host_path(grafana, home)
        assert local is not None and local.exists(), home


def test_dashboard_queries_use_the_provisioned_datasource(
    services: dict[str, dict[str, Any]], dashboards: list[dict[str, Any]]
) -> None:
    sources = [s for path in (PROVISIONING / "datasources").glob("*.yml") for s in load_yaml(path)["datasources"]]
    (prometheus,) = [s for s in sources if s["type"] == "prometheus"]
    host, _, port = urllib.parse.urlsplit(prometheus["url"]).netloc.partition(":")
    assert host in services and int(port) in container_ports(host, services[host])
    for board in dashboards:
        for panel in panels(board):
            for ref in [panel.get("datasource"), *(t.get("datasource") for t in panel.get("targets", []))]:
                if ref is not None:
                    assert ref == {"type": "prometheus", "uid": prometheus["uid"]}, (board["title"], panel["title"])


def test_dashboard_panels_have_unique_ids_and_titles(dashboards: list[dict[str, Any]]) -> None:
    for board in dashboards:
        ids = [panel["id"] for panel in panels(board)]
        assert len(ids) == len(set(ids)), board["title"]
        assert all(panel.get("title") for panel in panels(board))


# ---- compose healthchecks and validity ---------------------------------------------------------------------


def healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def test_gateway_healthcheck_asks_readyz(services: dict[str, dict[str, Any]]) -> None:
    assert ":3000/readyz" in healthcheck_text(services["gateway"])


def test_worker_healthcheck_runs_worker_check(services: dict[str, dict[str, Any]]) -> None:
    assert "python -m worker --check" in healthcheck_text(services["worker"])


def test_compose_file_passes_docker_compose_config() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose not installed")
    for profile in ([], ["--profile", "monitoring"], ["--profile", "ha"], ["--profile", "tools"]):
        result = subprocess.run([tool, "-f", str(COMPOSE), *profile, "config", "-q"], capture_output=True, text=True,
                                timeout=60, check=False, cwd=ROOT)
        assert result.returncode == 0, result.stderr
