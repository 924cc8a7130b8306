"""The service's settings: environment variables prefixed ``SELLFERN_WEBHOOKS_`` and nothing else.

Built once at the entry point (``Settings.load()``) and passed down; no other module reads the
environment.
"""

from __future__ import annotations

import binascii
import ipaddress
import os
from base64 import urlsafe_b64decode
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.amqp import node_urls

SUPPORTED_DATABASE_SCHEMES = ("sqlite+aiosqlite", "postgresql+asyncpg")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _lower(value: object) -> object:
    """Names of a fixed set (log levels, formats) in any case: ``INFO`` as ``info``."""
    return value.strip().lower() if isinstance(value, str) else value


def _in_networks(host: str | None, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether ``host`` is an IP address inside one of ``networks``."""
    try:
        address = ipaddress.ip_address((host or "").strip("[]"))
    except ValueError:
        return False
    return any(address in network for network in networks)


class SettingsError(Exception):
    """A setting has a value the service cannot start with; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SELLFERN_WEBHOOKS_", case_sensitive=False, extra="ignore"
    )

    database_url: str = "sqlite+aiosqlite:///./sellfern-webhooks.db"
    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    api_host: str = "0.0.0.0"  # noqa: S104 - the API is meant to be reached from outside the pod
    api_port: int = Field(default=8080, ge=0, le=65535)
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    retry_schedule: Annotated[tuple[float, ...], NoDecode] = (
        5,
        300,
        1800,
        7200,
        18000,
        36000,
        36000,
    )
    # Each retry delay is spread by up to this fraction either way, so that a burst that
    # failed together does not come back together (a few fixed-TTL tiers around each delay).
    retry_jitter: float = Field(default=0.2, ge=0, lt=1)
    delivery_timeout: float = Field(default=15, gt=0, le=300)
    ca_bundle: str | None = None
    allowed_private_networks: Annotated[tuple[IPNetwork, ...], NoDecode] = ()
    # An HTTP proxy that every delivery tunnels through with CONNECT (worker.pipeline.egress);
    # unset, deliveries connect directly. It may carry credentials: never echo it.
    egress_proxy_url: str | None = None
    log_format: Annotated[Literal["json", "console"], BeforeValidator(_lower)] = "json"
    log_level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = (
        "info"
    )
    # Fernet keys sealing the signing secrets at rest; the first seals, all open
    # (worker.store.crypto).
    secret_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    # Allows PostgreSQL without SECRET_KEYS, with a public development key. Never in production.
    dev_mode: bool = False
    # Per API token, per process: a token bucket refilled at this rate, holding at most BURST.
    rate_limit_per_second: float = Field(default=20, gt=0)
    rate_limit_burst: int = Field(default=100, ge=1)
    # The platform's identity provider (worker.api.jwt_tokens): with JWT_JWKS_URL set, bearer
    # tokens may also be its JWTs (RS256/ES256), and JWT_ISSUER and JWT_AUDIENCE are required.
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = Field(default=None, validate_default=True)
    jwt_audience: str | None = Field(default=None, validate_default=True)
    jwt_org_claim: str = Field(default="org_id", min_length=1)

    # Tuning knobs; the defaults suit one worker process on two cores.
    delivery_concurrency: int = Field(default=256, ge=1, le=10_000)
    endpoint_concurrency: int = Field(default=32, ge=1, le=10_000)
    shutdown_drain_seconds: float = Field(default=20, ge=0)
    # Consumer processes of `worker` and `serve` (worker.supervisor); "auto" is one per core.
    worker_processes: Annotated[int, NoDecode] = 1
    max_event_bytes: int = Field(default=256 * 1024, ge=1024)
    auto_disable_after_seconds: float = Field(default=5 * 24 * 3600, gt=0)
    # Events and attempts older than this are pruned by the worker, hourly.
    retention_days: float = Field(default=30, gt=0)

    # Tracing (worker.ops.tracing): the standard OpenTelemetry variables, without the prefix.
    # Without an endpoint no span is recorded; OTEL_SDK_DISABLED=true turns it off regardless.
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        default=None, validation_alias="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    otel_service_name: str = Field(
        default="sellfern-webhooks", validation_alias="OTEL_SERVICE_NAME"
    )
    otel_sdk_disabled: str = Field(default="", validation_alias="OTEL_SDK_DISABLED")

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str) -> str:
        scheme = value.split("://", 1)[0]
        if scheme not in SUPPORTED_DATABASE_SCHEMES:
            supported = ", ".join(f"{s}://" for s in SUPPORTED_DATABASE_SCHEMES)
            raise ValueError(f"unsupported database URL scheme {scheme!r}; use one of {supported}")
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: str) -> str:
        # Several comma-separated URLs are the nodes of a cluster (schemas.amqp).
        urls = node_urls(value)
        if not urls:
            raise ValueError("must name at least one amqp:// or amqps:// URL")
        for url in urls:
            if not url.startswith(("amqp://", "amqps://")):
                scheme = url.split("://", 1)[0] if "://" in url else "no scheme"
                raise ValueError(f"each URL must start with amqp:// or amqps://, not {scheme!r}")
        return value

    @field_validator("retry_schedule", mode="before")
    @classmethod
    def _parse_schedule(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            delays = tuple(float(p) for p in parts)
        except ValueError:
            raise ValueError(
                f"expected comma-separated seconds such as 5,300,1800, got {value!r}"
            ) from None
        if any(d <= 0 for d in delays):
            raise ValueError("every delay must be a positive number of seconds")
        return delays

    @field_validator("worker_processes", mode="before")
    @classmethod
    def _parse_processes(cls, value: object) -> object:
        text = str(value).strip().lower()
        if text == "auto":
            return os.cpu_count() or 1
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            raise ValueError(f"expected an integer of at least 1 or auto, got {value!r}")
        return int(text)

    @field_validator("allowed_private_networks", mode="before")
    @classmethod
    def _parse_networks(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        try:
            return tuple(
                ipaddress.ip_network(p.strip(), strict=False) for p in value.split(",") if p.strip()
            )
        except ValueError as exc:
            raise ValueError(f"expected comma-separated CIDRs such as 127.0.0.0/8: {exc}") from None

    @field_validator("egress_proxy_url")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # an empty variable, as a ConfigMap leaves it, means no proxy
        url = urlsplit(value.strip())
        example = "such as http://egress-proxy:4750"
        if url.scheme != "http":
            raise ValueError(f"must be an http:// URL {example} (deliveries tunnel with CONNECT)")
        try:
            port = url.port
        except ValueError:
            port = None
        if not url.hostname or port is None:
            raise ValueError(f"must name the proxy's host and port, {example}")
        if url.path not in ("", "/") or url.query or url.fragment:
            raise ValueError(f"must hold only the proxy's address, {example}")
        return value.strip()

    @field_validator("jwt_jwks_url")
    @classmethod
    def _jwks_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not value.strip():
            return None  # an empty variable, as a ConfigMap leaves it, means no JWTs
        url = urlsplit(value.strip())
        # The keys decide which tokens are genuine: they must come over TLS, but from an
        # identity provider on an address of ALLOWED_PRIVATE_NETWORKS (declared earlier, so
        # validated by now), as endpoints there may be plain http too.
        private = _in_networks(url.hostname, info.data.get("allowed_private_networks", ()))
        if not url.hostname or not (url.scheme == "https" or (url.scheme == "http" and private)):
            raise ValueError(
                "must be an https:// URL, such as https://id.example.com/.well-known/jwks.json "
                "(http:// only on an IP address inside SELLFERN_WEBHOOKS_ALLOWED_PRIVATE_NETWORKS)"
            )
        return value.strip()

    @field_validator("jwt_issuer", "jwt_audience")
    @classmethod
    def _needed_with_jwks(cls, value: str | None, info: ValidationInfo) -> str | None:
        value = value.strip() if value else None
        # Fields validate in order, so the URL (declared first) is in ``info.data`` if valid.
        if not value and info.data.get("jwt_jwks_url"):
            raise ValueError("must be set when SELLFERN_WEBHOOKS_JWT_JWKS_URL is set")
        return value or None

    @field_validator("secret_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        keys = tuple(p.strip() for p in value.split(",") if p.strip())
        for position, key in enumerate(keys, 1):
            try:
                valid = len(urlsafe_b64decode(key.encode("ascii"))) == 32
            except (binascii.Error, UnicodeError, ValueError):
                valid = False
            if not valid:
                # Never echo the value: it is a key.
                raise ValueError(
                    f"key {position} is not a Fernet key (url-safe base64 of 32 bytes)"
                )
        return tuple(SecretStr(k) for k in keys)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @classmethod
    def load(cls) -> Settings:
        """Read the environment; raise :class:`SettingsError` naming each bad variable."""
        try:
            return cls()
        except ValidationError as exc:
            lines = []
            for error in exc.errors():
                field = str(error["loc"][0]) if error["loc"] else "?"
                message = error["msg"].removeprefix("Value error, ")
                lines.append(f"SELLFERN_WEBHOOKS_{field.upper()}: {message}")
            raise SettingsError("; ".join(lines)) from None
