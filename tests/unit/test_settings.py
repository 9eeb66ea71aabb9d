"""The one settings object: defaults from the issue, environment names, and cross-field rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.settings import Settings


def test_defaults_match_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "RPC_TIMEOUT", "BODY_LIMIT", "MAX_ATTEMPTS", "SHARD_COUNT"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.port == 3000
    assert settings.rpc_timeout == 10.0
    assert settings.body_limit == 64 * 1024
    assert settings.max_attempts == 5
    assert settings.shard_count == 2


def test_settings_come_from_upper_case_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://x@db:5432/crm")
    monkeypatch.setenv("AMQP_URL", "amqp://u:p@mq:5672/v")
    monkeypatch.setenv("PORT", "3100")
    monkeypatch.setenv("HOST", "127.0.0.1")
    settings = Settings()
    assert (settings.database_url, settings.amqp_url, settings.port, settings.host) == (
        "postgresql://x@db:5432/crm", "amqp://u:p@mq:5672/v", 3100, "127.0.0.1")


def test_retention_shorter_than_the_idempotency_window_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCESSED_RETENTION_HOURS", "12")
    monkeypatch.setenv("IDEMPOTENCY_WINDOW_HOURS", "24")
    with pytest.raises(ValidationError):
        Settings()
