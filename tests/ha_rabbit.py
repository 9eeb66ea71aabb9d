"""HA test support: a real RabbitMQ cluster of extra nodes on this machine, whose nodes tests kill and restart.

``RabbitCluster`` starts N (default 3) extra ``rabbitmq-server`` nodes beside the machine's own broker (which it
never touches): each has its own node name, AMQP and distribution ports, config, enabled-plugins file, data
and log directories, all in one temporary directory. The servers run as user ``rabbitmq``, so every node and
``rabbitmqctl`` share the Erlang cookie in ``/var/lib/rabbitmq``. Nodes 2..N join node 1 (``stop_app``,
``join_cluster``, ``start_app``), and the build waits until ``cluster_status`` shows all of them running.

Everything is removed on the way out, also after a build that failed half-way: every process of every node is
killed by its session id (no beam process stays behind; epmd forgets a node when its process is gone) and the
directory is deleted. Where the machine has no RabbitMQ, or we are neither root nor ``rabbitmq``, entering the
cluster skips the test, saying why.

The methods block (they run ``rabbitmqctl``): from async code call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from bench.stack import free_port
from tests.native_fixture import NativeFixture

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
RABBIT_USER = "rabbitmq"
HOST = "localhost"  # short node names, as the machine's own node (rabbit@localhost)
BOOT_TIMEOUT = 120.0


# --- processes by session ------------------------------------------------------------------------------------


def session_pids(sid: int) -> list[int]:
    """The processes of session ``sid`` (a server started in a session of its own, with all its children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[3]) == sid:
                    found.append(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is gone for our purposes.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    return False


def kill_session(sid: int, *pids: int) -> None:
    """kill -9 ``pids`` first, then every process of session ``sid``, until none is left (at most ~10 s)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [pid for pid in session_pids(sid) if pid_alive(pid)]
        if not left and not any(pid_alive(pid) for pid in pids):
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def as_user(user: str) -> list[str]:
    """The command prefix that runs a program as ``user`` (nothing when we already are that user).

    ``setpriv`` executes the program in place (``runuser`` would fork and wait), so the process we start is the
    server's own session leader.
    """
    if pwd.getpwuid(os.getuid()).pw_name == user:
        return []
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]


# --- the cluster ---------------------------------------------------------------------------------------------


def rabbitmq_unavailable() -> str | None:
    """Why no cluster can be built here (``None`` when one can)."""
    if not (RABBIT_BIN / "rabbitmq-server").exists() or not (RABBIT_BIN / "rabbitmqctl").exists():
        return f"rabbitmq-server not installed ({RABBIT_BIN} missing)"
    try:
        user = pwd.getpwnam(RABBIT_USER)
    except KeyError:
        return f"no user {RABBIT_USER}"
    if os.getuid() not in (0, user.pw_uid):
        return f"needs root or {RABBIT_USER} to run RabbitMQ nodes as {RABBIT_USER}"
    if os.getuid() == 0 and shutil.which("setpriv") is None:
        return "setpriv (util-linux) not installed"
    if not (Path(user.pw_dir) / ".erlang.cookie").exists():
        return f"no Erlang cookie in {user.pw_dir} (start the machine's RabbitMQ once)"
    return None


class RabbitNode:
    """One node of the cluster: its name, ports and files, and its server process when running."""

    def __init__(self, index: int, name: str, base: Path, extra_config: str) -> None:
        self.index = index
        self.name = name
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = base / name.split("@")[0]
        self.pid_file = self.dir / "rabbit.pid"
        self.log_path = self.dir / "server.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.dir.mkdir()
        (self.dir / "mnesia").mkdir()
        (self.dir / "log").mkdir()
        (self.dir / "rabbitmq.conf").write_text(
            "loopback_users = none\n"
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "log.console = false\n"
            "log.file.level = info\n"
            f"{extra_config}\n"
        )
        # No plugins: the machine-wide enabled_plugins (prometheus, management) would bind 15692/15672 again.
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("# this node's settings are all in its environment\n")

    def env(self) -> dict[str, str]:
        home = pwd.getpwnam(RABBIT_USER).pw_dir
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": home,  # its .erlang.cookie is the one every node and rabbitmqctl use
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),  # absent: none
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def launch(self) -> None:
        """Start the server (foreground, in a session of its own, as user rabbitmq)."""
        self.pid_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [*as_user(RABBIT_USER), str(RABBIT_BIN / "rabbitmq-server")],
                env=self.env(), cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def beam_pid(self) -> int | None:
        """The OS pid of the node's Erlang VM (from its pid file), if it is running."""
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pid_file.read_text().split()[0])
            if pid_alive(pid):
                return pid
        return None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait_listening(self, timeout: float) -> None:
        """Until the node accepts AMQP connections (its listener opens last in the boot)."""
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.popen is None or self.popen.poll() is not None:
                raise RuntimeError(f"node {self.name} exited while booting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.name} not listening on {self.port} after {timeout}s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """kill -9 of the Erlang VM, then of anything else left in the node's session."""
        if self.popen is None:
            return
        beam = self.beam_pid()
        if beam is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(beam, signal.SIGKILL)
        # The server script reaps its VM and exits (no zombie left to init); then whatever else is left goes.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        kill_session(self.popen.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        self.popen = None

    def log_tail(self, lines: int = 40) -> str:
        texts = []
        for path in [self.log_path, *sorted((self.dir / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                texts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(texts)


class RabbitCluster(NativeFixture):
    """N extra RabbitMQ nodes clustered together on this machine; a sync or async context manager.

    ``extra_config`` is appended to every node's ``rabbitmq.conf`` (e.g. ``cluster_partition_handling =
    pause_minority``).
    """

    def __init__(self, size: int = 3, *, extra_config: str = "", boot_timeout: float = BOOT_TIMEOUT) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self.size = size
        self.extra_config = extra_config
        self.boot_timeout = boot_timeout
        self.tag = f"crmha{uuid.uuid4().hex[:6]}"
        self.base: Path | None = None
        self.nodes: list[RabbitNode] = []
        self.build_seconds: float | None = None

    # --- life cycle -------------------------------------------------------------------------------------------

    def unavailable(self) -> str | None:
        return rabbitmq_unavailable()

    def build(self) -> None:
        """Start every node at once, join nodes 2..N to node 1, wait until all run in one cluster."""
        started = time.monotonic()
        self.base = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.base.chmod(0o755)
        self.nodes = [
            RabbitNode(i, f"{self.tag}{chr(ord('a') + i)}@{HOST}", self.base, self.extra_config)
            for i in range(self.size)
        ]
        user = pwd.getpwnam(RABBIT_USER)
        for path in [self.base, *self.base.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_listening(self.boot_timeout)
        first = self.nodes[0].name
        for node in self.nodes[1:]:
            self.rabbitmqctl("stop_app", node=node.index)
            self.rabbitmqctl("join_cluster", first, node=node.index)
            self.rabbitmqctl("start_app", node=node.index, timeout=self.boot_timeout)
        self.wait_running()
        self.build_seconds = time.monotonic() - started

    def close(self) -> None:
        """Stop every node (SIGTERM, then kill -9 of whatever is left) and delete the directory; safe twice."""
        for node in self.nodes:
            beam = node.beam_pid()
            if beam is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(beam, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while any(node.running() for node in self.nodes) and time.monotonic() < deadline:
            time.sleep(0.1)
        for node in self.nodes:
            node.kill()
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    # --- what tests connect to ------------------------------------------------------------------------------

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.nodes]

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def url(self, node_index: int, vhost: str = "/") -> str:
        """The AMQP URL of one node (guest/guest)."""
        return f"amqp://guest:guest@127.0.0.1:{self.nodes[node_index].port}/{urllib.parse.quote(vhost, safe='')}"

    def urls(self, vhost: str = "/") -> list[str]:
        """One AMQP URL per node, in node order."""
        return [self.url(node.index, vhost) for node in self.nodes]

    def amqp_url(self, vhost: str = "/") -> str:
        """Every node's URL, comma-separated: the ``AMQP_URL`` form for a cluster (``shared.brokers``)."""
        return ",".join(self.urls(vhost))

    def add_vhost(self, name: str) -> None:
        """Create a vhost on the cluster and give guest every permission on it."""
        self.rabbitmqctl("add_vhost", name)
        self.rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")

    def delete_vhost(self, name: str) -> None:
        self.rabbitmqctl("delete_vhost", name)

    # --- the CLI ---------------------------------------------------------------------------------------------

    def node_index_of(self, name: str) -> int:
        """The index of the node named ``name`` (``ValueError`` when it is none of ours)."""
        return self.node_names.index(name)

    def _live_index(self, node: int | None) -> int:
        """``node``, or when it is None the first node whose server is running and booted (listening: a node
        being restarted in the background is not asked)."""
        if node is not None:
            return node
        return next((n.index for n in self.nodes if n.running() and port_open(n.port)), 0)

    def cli(self, tool: str, *args: str, node: int | None = None, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a RabbitMQ CLI tool (``rabbitmqctl``, ``rabbitmq-queues``...) on one node (default: a live one)."""
        target = self.nodes[self._live_index(node)]
        env = {key: value for key, value in target.env().items() if key in ("PATH", "HOME", "LANG", "LC_ALL")}
        env["RABBITMQ_CONF_ENV_FILE"] = str(target.dir / "rabbitmq-env.conf")
        result = subprocess.run(
            [*as_user(RABBIT_USER), str(RABBIT_BIN / tool), "-n", target.name, *args],
            env=env, cwd=target.dir, capture_output=True, text=True, timeout=timeout, check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} -n {target.name} {' '.join(args)} exited {result.returncode}:\n"
                               f"{result.stdout}\n{result.stderr}")
        return result

    def rabbitmqctl(self, *args: str, node: int | None = None, timeout: float = 60,
                    check: bool = True) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n NODE args...`` (default: the first running node); raises when it fails and ``check``."""
        return self.cli("rabbitmqctl", *args, node=node, timeout=timeout, check=check)

    def _json(self, *args: str, node: int | None = None) -> Any:
        return json.loads(self.rabbitmqctl(*args, "--formatter", "json", "-q", node=node).stdout)

    def cluster_status(self, node: int | None = None) -> dict[str, Any]:
        """``rabbitmqctl cluster_status`` as JSON (keys ``disk_nodes``, ``running_nodes``, ``partitions``...)."""
        status: dict[str, Any] = self._json("cluster_status", node=node)
        return status

    def running_nodes(self, node: int | None = None) -> list[str]:
        """The cluster's running nodes, as one node sees them."""
        return list(self.cluster_status(node)["running_nodes"])

    def wait_running(self, nodes: list[int] | None = None, timeout: float = BOOT_TIMEOUT) -> None:
        """Until ``cluster_status`` shows ``nodes`` (default: every node) running in the cluster."""
        wanted = {self.nodes[i].name for i in (range(self.size) if nodes is None else nodes)}
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.running_nodes()
                if wanted <= set(last):
                    return
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                last = exc
            time.sleep(0.5)
        raise TimeoutError(f"nodes {sorted(wanted)} not all running after {timeout}s; last status: {last}")

    def set_policy(self, name: str, pattern: str, definition: dict[str, Any] | str, *, vhost: str = "/",
                   apply_to: str = "queues", priority: int = 0) -> None:
        """``rabbitmqctl set_policy`` (``definition`` as a dict or its JSON)."""
        body = definition if isinstance(definition, str) else json.dumps(definition)
        self.rabbitmqctl("set_policy", "-p", vhost, "--apply-to", apply_to, "--priority", str(priority),
                         name, pattern, body)

    def queue_info(self, vhost: str, queue: str, *fields: str) -> dict[str, Any]:
        """``list_queues`` columns of one queue (``KeyError`` when the queue does not exist)."""
        rows = self._json("list_queues", "-p", vhost, "name", *fields)
        for row in rows:
            if row["name"] == queue:
                found: dict[str, Any] = row
                return found
        raise KeyError(f"no queue {queue!r} in vhost {vhost!r}")

    def queue_leader(self, vhost: str, queue: str) -> str:
        """The node name of a quorum queue's leader."""
        return str(self.queue_info(vhost, queue, "leader")["leader"])

    def wait_queue_leader(self, vhost: str, queue: str, timeout: float = 60) -> str:
        """Until a running node leads the quorum queue (after its leader was killed: the election); its name.

        Publishes to a quorum queue without a leader are nacked: wait for this before asserting on confirms.
        """
        running = {node.name for node in self.nodes if node.running()}
        deadline = time.monotonic() + timeout
        leader: str | None = None
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, KeyError, subprocess.TimeoutExpired):
                leader = self.queue_leader(vhost, queue)
                if leader in running:
                    return leader
            time.sleep(0.2)
        raise TimeoutError(f"no running node leads {queue!r} after {timeout}s (last leader {leader!r})")

    def queue_members(self, vhost: str, queue: str) -> list[str]:
        """The node names of a quorum queue's members."""
        return list(self.queue_info(vhost, queue, "members")["members"])

    def queues(self, vhost: str, *fields: str) -> list[dict[str, Any]]:
        """``list_queues`` of a vhost in one call: a dict per queue with ``name`` and ``fields``."""
        rows: list[dict[str, Any]] = self._json("list_queues", "-p", vhost, "name", *fields)
        return rows

    def client_connections(self, vhost: str) -> list[dict[str, Any]]:
        """The client connections to ``vhost`` on every running node: ``node`` (its index, from the port the
        client connected to) and ``name`` (the client's ``connection_name``, ``""`` when it gave none)."""
        by_port = {node.port: node.index for node in self.nodes}
        rows = self._json("list_connections", "vhost", "port", "client_properties")
        found = []
        for row in rows:
            if row["vhost"] != vhost:
                continue
            properties = {prop[0]: prop[2] for prop in row["client_properties"]}
            found.append({"node": by_port[int(row["port"])], "name": str(properties.get("connection_name", ""))})
        return found

    def connections_on(self, node_index: int) -> int:
        """How many client connections node ``node_index`` holds."""
        if not self.nodes[node_index].running():
            return 0
        result = self.rabbitmqctl("eval", "length(rabbit_networking:local_connections()).", node=node_index)
        return int(result.stdout.strip())

    # --- faults ----------------------------------------------------------------------------------------------

    def pid(self, node_index: int) -> int | None:
        """The OS pid of a node's Erlang VM (``None`` when it is not running)."""
        return self.nodes[node_index].beam_pid()

    def kill(self, node_index: int) -> None:
        """kill -9 of a node's Erlang VM: no goodbye to its peers or clients."""
        self.nodes[node_index].kill()

    def start(self, node_index: int, wait: bool = True) -> None:
        """Start a killed node again on its own data: it rejoins the cluster; ``wait``: until it runs in it."""
        node = self.nodes[node_index]
        if node.running():
            return
        node.launch()
        if wait:
            node.wait_listening(self.boot_timeout)
            self.wait_running([node_index])

    def stop(self, node_index: int) -> None:
        """A clean stop of one node (``rabbitmqctl stop``): it tells its peers it is leaving."""
        node = self.nodes[node_index]
        if node.running():
            self.rabbitmqctl("stop", node=node_index, check=False, timeout=120)
        node.kill()
