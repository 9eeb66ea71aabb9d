"""How the system is packaged and run: docker-compose.yml, the Dockerfile, the entry points, README and CI.

There may be no Docker engine where the suite runs, so these tests read the files and check the promises the
README makes about them: every service is there and healthy before its dependants start, workers scale with
``docker compose up --scale worker=N``, every application process gets the same connection settings.
"""

from __future__ import annotations

import json
import re
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.rabbitmq.permissions import rabbitmq_password_matches
from shared.brokers import node_urls
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("migrate", "gateway", "worker")
ENTRY_MODULES = {
    "gateway": "gateway/__main__.py",
    "worker": "worker/__main__.py",
    "shared.migrate": "shared/migrate.py",
}


# ---------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(compose, dict) and isinstance(compose.get("services"), dict), "no services: mapping"
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def container_ports(service: dict[str, Any]) -> dict[int, str | None]:
    """{container port: published host port or None} for short ("[ip:]host:container[/proto]") and long syntax."""
    ports: dict[int, str | None] = {}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            published = entry.get("published")
            ports[int(entry["target"])] = None if published is None else str(published)
            continue
        spec = str(entry).split("/")[0]
        # The container port follows the last colon; before it come an optional IP and the host port,
        # which may be an interpolation such as "${PG_PORT:-5432}" (itself holding a colon).
        host, _, container = spec.rpartition(":")
        if not host:
            ports[int(container)] = None
        elif "${" in host:
            ports[int(container)] = host[host.index("${"):]
        else:
            ports[int(container)] = host.rpartition(":")[2]
    return ports


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(str(item).partition("=")[::2] for item in env)
    return {str(key): str(value) for key, value in env.items()}


def command_line(service: dict[str, Any]) -> str:
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if value is not None:
            parts.extend(value if isinstance(value, list) else [str(value)])
    return " ".join(parts)


def depends_on(service: dict[str, Any]) -> dict[str, str | None]:
    """{dependency: condition}; the short list form has no condition."""
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps)
    return {name: (spec or {}).get("condition") for name, spec in deps.items()}


def seconds(duration: str) -> float:
    """A compose duration ("30s", "1m30s", "1m") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"unparseable duration {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (name, _) in enumerate(instructions) if name == "FROM"]
    assert starts, "Dockerfile has no FROM"
    return instructions[starts[-1]:]


# ---------------------------------------------------------------------------------------------- docker compose


def test_compose_defines_postgres_rabbitmq_migrate_gateway_and_worker(services: dict[str, dict[str, Any]]) -> None:
    missing = {"postgres", "rabbitmq", *APP_SERVICES} - services.keys()
    assert not missing, f"missing services: {sorted(missing)}"
    assert str(services["postgres"]["image"]).startswith("postgres:")
    assert str(services["rabbitmq"]["image"]).startswith("rabbitmq:")


@pytest.mark.parametrize(("name", "probe"), [
    ("postgres", "pg_isready"),
    ("rabbitmq", "rabbitmq-diagnostics"),
    ("gateway", "/readyz"),
    ("worker", "--check"),
])
def test_every_long_running_service_has_a_healthcheck(
    services: dict[str, dict[str, Any]], name: str, probe: str
) -> None:
    check = services[name].get("healthcheck")
    assert isinstance(check, dict) and not check.get("disable"), f"{name} has no healthcheck"
    test = check["test"]
    text = " ".join(test) if isinstance(test, list) else str(test)
    assert test and text != "NONE" and probe in text, f"{name} healthcheck does not use {probe}: {text}"


def test_gateway_healthcheck_needs_no_curl(services: dict[str, dict[str, Any]]) -> None:
    """python:3.11-slim has no curl or wget: the probe must use Python itself."""
    test = services["gateway"]["healthcheck"]["test"]
    text = " ".join(test) if isinstance(test, list) else str(test)
    assert "curl" not in text and "wget" not in text
    assert "python" in text and ":3000/readyz" in text


def test_gateway_publishes_port_3000(services: dict[str, dict[str, Any]]) -> None:
    assert container_ports(services["gateway"]).get(3000) == "3000"


def test_rabbitmq_publishes_amqp_and_the_management_ui(services: dict[str, dict[str, Any]]) -> None:
    rabbitmq = services["rabbitmq"]
    assert "management" in str(rabbitmq["image"]), "the image without -management has no UI"
    ports = container_ports(rabbitmq)
    assert ports.get(15672), "management UI port 15672 is not published"
    assert ports.get(5672), "AMQP port 5672 is not published"


def test_worker_is_scalable(services: dict[str, dict[str, Any]]) -> None:
    """`docker compose up --scale worker=4` needs no fixed container name and no host port."""
    worker = services["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports")
    assert worker.get("network_mode") != "host"


def test_app_services_wait_for_healthy_services_and_the_migration(services: dict[str, dict[str, Any]]) -> None:
    healthy, completed = "service_healthy", "service_completed_successfully"
    assert depends_on(services["migrate"]) == {"postgres": healthy}
    assert depends_on(services["gateway"]).items() >= {"rabbitmq": healthy, "migrate": completed}.items()
    assert depends_on(services["worker"]).items() >= {
        "postgres": healthy, "rabbitmq": healthy, "migrate": completed
    }.items()


def test_every_dependency_condition_can_be_met(services: dict[str, dict[str, Any]]) -> None:
    """A service_healthy dependency without a healthcheck would never become healthy."""
    for name, service in services.items():
        for dependency, condition in depends_on(service).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert condition in ("service_healthy", "service_completed_successfully"), (name, dependency)
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}, which has none"


def test_migrate_is_a_one_shot_service(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    assert "python -m shared.migrate" in command_line(migrate)
    assert str(migrate.get("restart", "no")) == "no", "a restarting migrate never completes"


@pytest.mark.parametrize(("name", "module"), [("gateway", "gateway"), ("worker", "worker")])
def test_each_app_service_runs_its_entry_point(services: dict[str, dict[str, Any]], name: str, module: str) -> None:
    assert command_line(services[name]).endswith(f"python -m {module}")


def test_app_services_share_the_one_built_image(services: dict[str, dict[str, Any]]) -> None:
    builds = {name: services[name].get("build") for name in APP_SERVICES}
    for name, build in builds.items():
        context = build.get("context") if isinstance(build, dict) else build
        assert context in (".", "./"), f"{name} does not build the app image from this repository"
    assert len({str(services[name].get("image")) for name in APP_SERVICES}) == 1


def test_every_app_service_has_database_and_amqp_urls(services: dict[str, dict[str, Any]]) -> None:
    app_services = [name for name, service in services.items() if "build" in service]
    assert set(APP_SERVICES) <= set(app_services)
    for name in app_services:
        env = environment(services[name])
        assert "@postgres:" in env.get("DATABASE_URL", ""), f"{name}: DATABASE_URL must name the postgres service"
        assert "@rabbitmq:" in env.get("AMQP_URL", ""), f"{name}: AMQP_URL must name the rabbitmq service"


def test_gateway_and_workers_agree_on_the_topology(services: dict[str, dict[str, Any]]) -> None:
    """Routing is crc32(userId) % SHARD_COUNT: a different count in the worker would strand messages."""
    gateway, worker = environment(services["gateway"]), environment(services["worker"])
    for key in ("SHARD_COUNT", "AMQP_PREFIX", "QUEUE_TYPE"):
        assert gateway.get(key) == worker.get(key), key
    # The same broker and vhost; each with a user of its own (see the least-privilege tests below).
    assert broker_and_vhost(gateway["AMQP_URL"]) == broker_and_vhost(worker["AMQP_URL"])


def test_worker_leaves_migrations_to_the_migrate_service(services: dict[str, dict[str, Any]]) -> None:
    assert environment(services["worker"]).get("MIGRATE_ON_START", "").lower() == "false"


# ---- least privilege: each process connects with its own PostgreSQL role and RabbitMQ user (shared/roles.py)

ROLE_OF = {"gateway": "crm_gateway", "worker": "crm_worker", "replay": "crm_replay"}


def broker_and_vhost(url: str) -> list[tuple[str, str]]:
    """(host:port, vhost) of every node of an AMQP_URL node list."""
    return [(parts.netloc.rpartition("@")[2], parts.path) for parts in map(urllib.parse.urlsplit, node_urls(url))]


def url_user(url: str) -> str:
    """The one user name of every URL in a node list."""
    nodes = re.split(r",(?=[a-z]+://)", url)
    users = {urllib.parse.unquote(urllib.parse.urlsplit(node).username or "") for node in nodes}
    assert len(users) == 1, users
    return users.pop()


def test_migrate_service_creates_the_roles_with_passwords(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    assert "python -m shared.migrate --create-roles" in command_line(migrate)
    env = environment(migrate)
    assert url_user(env["DATABASE_URL"]) == "postgres", "roles and grants need the database owner"
    for role in ROLE_OF.values():
        assert env.get(f"{role.upper()}_PASSWORD"), f"{role} would have no password"


@pytest.mark.parametrize(("name", "role"), sorted(ROLE_OF.items()))
def test_each_app_service_connects_with_its_own_role_and_broker_user(
    services: dict[str, dict[str, Any]], name: str, role: str
) -> None:
    env = environment(services[name])
    assert url_user(env["DATABASE_URL"]) == role
    assert url_user(env["AMQP_URL"]) == role
    # The password in the URL is the one --create-roles sets (same variable, same default).
    migrate_env = environment(services["migrate"])
    password = urllib.parse.urlsplit(env["DATABASE_URL"]).password
    assert password == migrate_env[f"{role.upper()}_PASSWORD"]


def test_rabbitmq_loads_the_definitions_with_a_user_per_component(services: dict[str, dict[str, Any]]) -> None:
    mounts = {str(volume).split(":")[1]: str(volume).split(":")[0] for volume in services["rabbitmq"]["volumes"]
              if str(volume).startswith("./")}
    conf = mounts.get("/etc/rabbitmq/conf.d/20-crm.conf")
    assert conf is not None, "no rabbitmq.conf mounted into conf.d"
    settings = dict(line.split(" = ", 1) for line in (ROOT / conf).read_text(encoding="utf-8").splitlines()
                    if " = " in line and not line.startswith("#"))
    definitions_path = settings.get("load_definitions")
    assert definitions_path in mounts, "load_definitions names a file that is not mounted"
    definitions = json.loads((ROOT / mounts[definitions_path]).read_text(encoding="utf-8"))
    users = {user["name"]: user for user in definitions["users"]}
    for name, role in ROLE_OF.items():
        assert role in users and not users[role]["tags"], f"{role}: missing or tagged (a tag opens the UI)"
        first_node = node_urls(environment(services[name])["AMQP_URL"])[0]
        password = urllib.parse.unquote(urllib.parse.urlsplit(first_node).password or "")
        default = re.fullmatch(r"\$\{[A-Z_]+:-(.*)\}", password)
        assert rabbitmq_password_matches(users[role]["password_hash"], default[1] if default else password), role


@pytest.mark.parametrize("name", ["gateway", "worker"])
def test_stop_grace_period_exceeds_the_shutdown_deadline(services: dict[str, dict[str, Any]], name: str) -> None:
    """Docker sends SIGKILL after stop_grace_period (default 10 s): the drain must finish before that."""
    service = services[name]
    deadline = float(environment(service).get("SHUTDOWN_DEADLINE", Settings().shutdown_deadline))
    grace = seconds(str(service.get("stop_grace_period", "10s")))
    assert grace > deadline, f"{name}: stop_grace_period {grace}s <= SHUTDOWN_DEADLINE {deadline}s"


# -------------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_on_python_311_slim() -> None:
    image = final_stage(dockerfile_instructions())[0][1].split()[0]
    assert image.startswith("python:3.11") and "slim" in image, image


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [args.split()[0] for name, args in final_stage(dockerfile_instructions()) if name == "USER"]
    assert users, "no USER instruction: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_installs_the_project_without_test_extras() -> None:
    runs = [args for name, args in dockerfile_instructions() if name == "RUN"]
    assert any(re.search(r"pip install\b[^&;|]*\s\.(\s|$)", run) for run in runs), "no `pip install .`"
    assert not any("[test]" in run or " -e " in run for run in runs), "image must not have dev extras or -e"


def test_dockerfile_defaults_to_the_gateway() -> None:
    stage = final_stage(dockerfile_instructions())
    env = " ".join(args for name, args in stage if name == "ENV")
    assert "PYTHONUNBUFFERED=1" in env, "logs must not sit in a buffer"
    assert any(name == "EXPOSE" and "3000" in args.split() for name, args in stage)
    cmd = [args for name, args in stage if name == "CMD"]
    assert cmd and cmd[-1].replace(" ", "") == '["python","-m","gateway"]'


def test_dockerignore_keeps_the_context_small_but_buildable() -> None:
    patterns = {
        line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "bench/results"} <= patterns
    # `pip install .` needs these in the build context.
    assert not patterns & {"README.md", "pyproject.toml", "shared", "gateway", "worker", "*.md"}


# ------------------------------------------------------------------------------------------ entry points, CI


@pytest.mark.parametrize(("module", "path"), sorted(ENTRY_MODULES.items()))
def test_python_m_entry_point_exists(module: str, path: str) -> None:
    source = (ROOT / path).read_text(encoding="utf-8")
    assert "def main(" in source, f"python -m {module}: {path} has no main()"
    if path.endswith("__main__.py"):
        return
    assert 'if __name__ == "__main__":' in source, f"python -m {module} would do nothing"


def test_pyproject_declares_the_entry_points_and_ships_the_migrations() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    targets = set(pyproject["project"]["scripts"].values())
    assert {"gateway.__main__:main", "worker.__main__:main", "shared.migrate:main"} <= targets
    # The image installs the package (not editable): the SQL files must be package data.
    assert "migrations/*.sql" in pyproject["tool"]["setuptools"]["package-data"]["shared"]
    assert list((ROOT / "shared" / "migrations").glob("*.sql")), "no migrations shipped"
    test_extras = " ".join(pyproject["project"]["optional-dependencies"]["test"])
    for package in ("pytest", "pytest-asyncio", "pyyaml"):
        assert package in test_extras.lower(), package


def test_readme_starts_with_the_two_commands() -> None:
    head = "\n".join((ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:10])
    assert "docker compose up --build" in head
    assert "make test" in head


def test_ci_runs_the_readme_test_command() -> None:
    commands = [
        line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert any(re.fullmatch(r"(exec\s+)?make test", command) for command in commands), commands


# ---- profile "ha": a three-node RabbitMQ cluster ----------------------------------------------------------


def test_ha_profile_adds_two_rabbitmq_nodes_that_join_the_first(services: dict[str, dict[str, Any]]) -> None:
    peers = ["rabbitmq-2", "rabbitmq-3"]
    conf = (ROOT / "deploy/rabbitmq/cluster.conf").read_text(encoding="utf-8")
    for name in peers:
        peer = services[name]
        assert peer.get("profiles") == ["ha"], name
        assert peer.get("hostname") == name, "the node name rabbit@<hostname> must be the one peers look for"
        assert any("cluster.conf" in str(volume) for volume in peer.get("volumes", [])), name
        assert f"rabbit@{name}" in conf
    assert "rabbit@rabbitmq" in conf and "classic_config" in conf
    cookies = {str(environment(services[name]).get("RABBITMQ_COOKIE")) for name in ["rabbitmq", *peers]}
    assert len(cookies) == 1, "every node needs the same Erlang cookie"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_app_service_is_given_every_rabbitmq_node(services: dict[str, dict[str, Any]], name: str) -> None:
    hosts = [urllib.parse.urlsplit(url).hostname for url in node_urls(environment(services[name])["AMQP_URL"])]
    assert hosts == ["rabbitmq", "rabbitmq-2", "rabbitmq-3"]
