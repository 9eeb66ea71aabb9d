"""The one configuration object. Built once per process from the environment and passed down."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service. Environment variable = field name in upper case."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # Connections
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    host: str = "0.0.0.0"
    port: int = Field(3000, ge=1, le=65535)

    # Topology
    amqp_prefix: str = "crm"
    # Few shards on purpose: every worker consumes every shard, so shards do not limit worker scaling, and each
    # queue adds messages and fsyncs per request (measured on 2 cores: 2 shards ~5,000 req/s, 4 shards ~3,500).
    shard_count: int = Field(2, ge=1, le=1024)
    queue_type: Literal["quorum", "classic"] = "quorum"

    # Gateway
    rpc_timeout: float = Field(10.0, gt=0, description="seconds to wait for the worker before answering 202")
    publish_timeout: float = Field(5.0, gt=0, description="seconds to wait for a publisher confirm before 503")
    body_limit: int = Field(64 * 1024, ge=1024, description="largest accepted request body, in bytes")
    max_pack_size: int = Field(64, ge=1, description="requests packed into one AMQP message at most")
    publishes_in_flight: int = Field(2, ge=1, description="publishes per shard awaiting a confirm at once")
    retry_after_seconds: int = Field(5, ge=1, description="Retry-After sent with 503")
    gateway_db_pool_size: int = Field(2, ge=1, description="read-only connections for GET requests, at most")

    # Clock: every process stamps on the database server's clock (shared/timeline.py)
    clock_sync_interval: float = Field(2.0, gt=0, description="seconds between samples of the database clock")
    clock_skew_bound_ms: float = Field(
        25.0, gt=0, description="clock error (ms) above which a process logs it; a worker logs requests stamped "
        "further in the future")

    # Worker
    worker_prefetch: int = Field(32, ge=1, description="unacked AMQP messages (packs) per worker")
    worker_batch_size: int = Field(512, ge=1, description="requests applied in one transaction at most")
    worker_concurrency: int = Field(2, ge=1, description="batches applied at once per worker")
    db_pool_size: int = Field(4, ge=1)
    metrics_port: int = Field(9100, ge=0, le=65535, description="worker's /metrics port (0: off)")
    max_attempts: int = Field(5, ge=1, description="tries of a permanently failing request before dead-lettering")
    retry_base_delay: float = Field(0.5, ge=0, description="first backoff for a failing request, seconds")
    retry_max_delay: float = Field(10.0, ge=0, description="backoff cap, seconds")
    shutdown_deadline: float = Field(20.0, ge=0, description="seconds SIGTERM waits for in-flight work")
    processed_retention_hours: float = Field(48.0, gt=0, description="how long processed request ids are kept")
    idempotency_window_hours: float = Field(24.0, gt=0, description="how long an Idempotency-Key is honoured")
    migrate_on_start: bool = True

    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"

    @model_validator(mode="after")
    def _retention_covers_idempotency(self) -> Settings:
        # An Idempotency-Key is looked up in processed_requests: rows must outlive the key's window.
        if self.processed_retention_hours < self.idempotency_window_hours:
            raise ValueError("PROCESSED_RETENTION_HOURS must be at least IDEMPOTENCY_WINDOW_HOURS")
        return self
