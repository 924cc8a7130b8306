"""Settings come from SELLFERN_WEBHOOKS_* variables; a bad value names its variable."""

from __future__ import annotations

import ipaddress

import pytest

from worker.settings import Settings, SettingsError

pytestmark = pytest.mark.unit


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("SELLFERN_WEBHOOKS_"):
            monkeypatch.delenv(name)
    settings = Settings.load()
    assert settings.database_url == "sqlite+aiosqlite:///./sellfern-webhooks.db"
    assert settings.amqp_url == "amqp://guest:guest@localhost:5672/"
    assert (settings.api_host, settings.api_port, settings.metrics_port) == ("0.0.0.0", 8080, 9090)  # noqa: S104
    assert settings.retry_schedule == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert settings.delivery_timeout == 15
    assert settings.ca_bundle is None
    assert settings.allowed_private_networks == ()
    assert (settings.log_format, settings.log_level) == ("json", "info")


def test_values_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELLFERN_WEBHOOKS_RETRY_SCHEDULE", " 1, 2.5 ,60")
    monkeypatch.setenv("SELLFERN_WEBHOOKS_ALLOWED_PRIVATE_NETWORKS", "127.0.0.0/8, ::1/128")
    monkeypatch.setenv("SELLFERN_WEBHOOKS_DATABASE_URL", "postgresql+asyncpg://u@h/db")
    monkeypatch.setenv("SELLFERN_WEBHOOKS_API_PORT", "9000")
    settings = Settings.load()
    assert settings.retry_schedule == (1.0, 2.5, 60.0)
    assert settings.allowed_private_networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert not settings.is_sqlite
    assert settings.api_port == 9000


def test_log_level_and_format_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELLFERN_WEBHOOKS_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("SELLFERN_WEBHOOKS_LOG_FORMAT", " Console")
    settings = Settings.load()
    assert (settings.log_level, settings.log_format) == ("warning", "console")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("RETRY_SCHEDULE", "5,soon", "comma-separated seconds"),
        ("RETRY_SCHEDULE", "5,-1", "positive"),
        ("DATABASE_URL", "mysql://u@h/db", "unsupported database URL"),
        ("DATABASE_URL", "postgresql://u@h/db", "postgresql+asyncpg"),
        ("AMQP_URL", "http://localhost", "amqp://"),
        ("API_PORT", "eighty", "integer"),
        ("DELIVERY_TIMEOUT", "0", "greater than 0"),
        ("ALLOWED_PRIVATE_NETWORKS", "10.0.0.0/33", "CIDR"),
        ("LOG_FORMAT", "xml", "json"),
    ],
)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(f"SELLFERN_WEBHOOKS_{variable}", value)
    with pytest.raises(SettingsError) as caught:
        Settings.load()
    assert f"SELLFERN_WEBHOOKS_{variable}:" in str(caught.value)
    assert message in str(caught.value)
