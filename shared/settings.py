"""The one configuration object. Built once per process from the environment and passed down."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.brokers import node_urls

# Every connection made at start-up, by --check or by a one-shot tool gives up after this long: a healthcheck
# must answer within its own timeout.
CONNECT_TIMEOUT: Final = 5.0


class Settings(BaseSettings):
    """Every knob of the service. Environment variable = field name in upper case."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # Connections
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    amqp_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/",
        description="one URL, or one per node of a cluster separated by commas (a process uses one that answers "
        "and moves to another when it loses it)")
    host: str = "0.0.0.0"
    port: int = Field(3000, ge=1, le=65535)

    # Topology
    amqp_prefix: str = "crm"
    # Few shards on purpose: every worker consumes every shard, so shards do not limit worker scaling, and each
    # queue adds messages and fsyncs per request (measured on 2 cores: 2 shards ~5,000 req/s, 4 shards ~3,500).
    shard_count: int = Field(2, ge=1, le=1024)
    queue_type: Literal["quorum", "classic"] = "quorum"
    quorum_replicas: int = Field(
        5, ge=1, le=9, description="replicas of each quorum queue: one per node, as many as the cluster has up to "
        "this (x-quorum-initial-group-size)")
    queue_max_length: int = Field(
        100_000, ge=1, description="messages a shard queue holds at most; past it publishes are refused (503)")

    # Gateway
    rpc_timeout: float = Field(10.0, gt=0, description="seconds to wait for the worker before answering 202")
    publish_timeout: float = Field(5.0, gt=0, description="seconds to wait for a publisher confirm before 503")
    body_limit: int = Field(64 * 1024, ge=1024, description="largest accepted request body, in bytes")
    max_pack_size: int = Field(64, ge=1, description="requests packed into one AMQP message at most")
    publishes_in_flight: int = Field(2, ge=1, description="publishes per shard awaiting a confirm at once")
    retry_after_seconds: int = Field(5, ge=1, description="Retry-After sent with 503")
    gateway_db_pool_size: int = Field(2, ge=1, description="read-only connections for GET requests, at most")

    # Backpressure and slow clients (gateway)
    max_in_flight: int = Field(10_000, ge=1, description="requests a gateway handles at once; 503 past it")
    client_timeout: float = Field(
        30.0, gt=0, description="seconds a client has to send a whole request (headers and body)")
    keepalive_timeout: float = Field(75.0, gt=0, description="seconds an idle keep-alive connection is kept")
    max_header_size: int = Field(8190, ge=1024, description="bytes of the request line or of one header, at most")
    max_headers: int = Field(100, ge=10, description="headers in one request, at most")

    # API keys and rate limits (gateway: gateway/middleware/auth.py, gateway/middleware/ratelimit.py)
    api_keys_file: str = Field(
        "", description="file of name:sha256hex[:rate:burst] lines, re-read on change and on SIGHUP (empty: none)")
    api_keys: str = Field("", description="the same entries separated by commas (empty: none; keys off if both are)")
    rate_limit: float = Field(
        0.0, ge=0, allow_inf_nan=False,
        description="requests/s per API key (per client address with keys off) on /api/external/*; 0: off")
    rate_burst: int = Field(0, ge=0, description="token-bucket size: requests allowed at once (0: ceil(RATE_LIMIT))")
    protect_docs: bool = Field(False, description="/docs and /openapi.json need an API key too")
    protect_metrics: bool = Field(False, description="/metrics needs an API key too")

    # Clock: every process stamps on the database server's clock (shared/clock/timeline.py)
    clock_sync_interval: float = Field(2.0, gt=0, description="seconds between samples of the database clock")
    clock_skew_bound_ms: float = Field(
        25.0, gt=0, description="clock error (ms) above which a process logs it; a worker logs requests stamped "
        "further in the future")

    # Worker
    worker_prefetch: int = Field(32, ge=1, description="unacked AMQP messages (packs) per worker")
    worker_batch_size: int = Field(512, ge=1, description="requests applied in one transaction at most")
    worker_concurrency: int = Field(2, ge=1, description="batches applied at once per worker")
    db_pool_size: int = Field(4, ge=1, description="PostgreSQL connections per worker, at most")
    metrics_port: int = Field(9100, ge=0, le=65535, description="worker's /metrics port (0: off)")
    max_attempts: int = Field(5, ge=1, description="tries of a permanently failing request before dead-lettering")
    retry_base_delay: float = Field(0.5, ge=0, description="first backoff for a failing request, seconds")
    retry_max_delay: float = Field(10.0, ge=0, description="backoff cap, seconds")
    shutdown_deadline: float = Field(20.0, ge=0, description="seconds SIGTERM waits for in-flight work")
    processed_retention_hours: float = Field(48.0, gt=0, description="how long processed request ids are kept")
    idempotency_window_hours: float = Field(24.0, gt=0, description="how long an Idempotency-Key is honoured")
    migrate_on_start: bool = True

    # Least privilege (shared/roles.py): `python -m shared.migrate --create-roles` creates the roles
    # <DB_ROLE_PREFIX>worker / gateway / replay and sets these passwords (unset: a role's password is left as is).
    db_role_prefix: str = Field("crm_", pattern=r"^[a-z_][a-z0-9_]{0,40}$",
                                description="name prefix of the PostgreSQL roles made by --create-roles")
    crm_worker_password: SecretStr | None = Field(None, description="password of the worker's role")
    crm_gateway_password: SecretStr | None = Field(None, description="password of the gateway's role")
    crm_replay_password: SecretStr | None = Field(None, description="password of the replay tool's role")

    @field_validator("crm_worker_password", "crm_gateway_password", "crm_replay_password")
    @classmethod
    def _printable_ascii(cls, value: SecretStr | None) -> SecretStr | None:
        # The SCRAM verifier is computed client-side (shared/roles.py), where SASLprep is the identity only for
        # ASCII; the value itself is never echoed in the error.
        if value is not None and not all(" " <= char <= "~" for char in value.get_secret_value()):
            raise ValueError("must be printable ASCII")
        return value

    # Dead-letter console (python -m console, console/)
    console_host: str = Field(
        "127.0.0.1", description="address the console listens on; other than loopback it needs console keys")
    console_port: int = Field(8090, ge=1, le=65535, description="the console's port")
    console_keys_file: str = Field(
        "", description="file of name:sha256hex:role lines (role viewer or operator), read at start (empty: none)")
    console_keys: str = Field(
        "", description="the same entries separated by commas (empty: none; without keys the console runs on a "
        "loopback CONSOLE_HOST only, everyone an operator)")
    console_secure_cookie: bool = Field(
        False, description="mark the session cookie Secure (set it when the console is reached over HTTPS)")
    console_secret: SecretStr | None = Field(
        None, description="key that signs session cookies (unset: a random one per process, so a restart logs "
        "everyone out; set it to keep sessions across restarts)")

    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"

    @field_validator("amqp_url")
    @classmethod
    def _node_list(cls, value: str) -> str:
        node_urls(value)  # raises ValueError naming the position of a bad URL, never its password
        return value

    @property
    def amqp_urls(self) -> list[str]:
        return node_urls(self.amqp_url)

    @model_validator(mode="after")
    def _retention_covers_idempotency(self) -> Settings:
        # An Idempotency-Key is looked up in processed_requests: rows must outlive the key's window.
        if self.processed_retention_hours < self.idempotency_window_hours:
            raise ValueError("PROCESSED_RETENTION_HOURS must be at least IDEMPOTENCY_WINDOW_HOURS")
        return self

    @model_validator(mode="after")
    def _one_source_of_api_keys(self) -> Settings:
        # Two sources would leave a reader guessing which key came from where (and only the file rotates).
        if self.api_keys_file.strip() and self.api_keys.strip():
            raise ValueError("set API_KEYS_FILE or API_KEYS, not both")
        return self

    @field_validator("console_secret", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: object) -> object:
        # CONSOLE_SECRET= (compose passes an unset variable as empty): no secret, never an empty signing key.
        return None if value == "" else value

    @model_validator(mode="after")
    def _one_source_of_console_keys(self) -> Settings:
        if self.console_keys_file.strip() and self.console_keys.strip():
            raise ValueError("set CONSOLE_KEYS_FILE or CONSOLE_KEYS, not both")
        return self


# Which settings each entry point reads: its --help lists these and no others (shared/cli.py). A unit test checks
# that every setting is read by at least one entry point.
_TOPOLOGY: Final = ("amqp_prefix", "shard_count", "queue_type", "quorum_replicas", "queue_max_length")
_CLOCK: Final = ("clock_sync_interval", "clock_skew_bound_ms")
_LOGS: Final = ("log_level", "log_format")
READ_BY: Final[Mapping[str, tuple[str, ...]]] = {
    "gateway": (
        "database_url", "amqp_url", "host", "port", *_TOPOLOGY, "rpc_timeout", "publish_timeout", "body_limit",
        "max_pack_size", "publishes_in_flight", "retry_after_seconds", "gateway_db_pool_size", "max_in_flight",
        "client_timeout", "keepalive_timeout", "max_header_size", "max_headers", "api_keys_file", "api_keys",
        "rate_limit", "rate_burst", "protect_docs", "protect_metrics", "shutdown_deadline",
        "processed_retention_hours", "idempotency_window_hours", *_CLOCK, *_LOGS,
    ),
    "worker": (
        "database_url", "amqp_url", "host", *_TOPOLOGY, "worker_prefetch", "worker_batch_size", "worker_concurrency",
        "db_pool_size", "metrics_port", "max_attempts", "retry_base_delay", "retry_max_delay", "shutdown_deadline",
        "processed_retention_hours", "idempotency_window_hours", "migrate_on_start", *_CLOCK, *_LOGS,
    ),
    "migrate": (
        "database_url", "db_role_prefix", "crm_worker_password", "crm_gateway_password", "crm_replay_password",
        *_LOGS,
    ),
    "replay": ("database_url", "amqp_url", *_TOPOLOGY, *_CLOCK, *_LOGS),
    "console": (
        "database_url", "amqp_url", *_TOPOLOGY, "console_host", "console_port", "console_keys_file", "console_keys",
        "console_secure_cookie", "console_secret", *_CLOCK, *_LOGS,
    ),
}
