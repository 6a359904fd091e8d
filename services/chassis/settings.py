"""Settings base: 12-factor, one env prefix per service (GATEWAY_, AUTH_, ...)."""
from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set `model_config = service_config("GATEWAY_")`."""

    model_config = SettingsConfigDict(extra="ignore")

    service_name: str = "aistack"
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "INFO"
    # One REDIS_URL / DATABASE_URL for the stack (unprefixed, DESIGN.md); services isolate
    # themselves by Postgres schema and Redis key prefix.
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("redis_url", "REDIS_URL"))
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("database_url", "DATABASE_URL")
    )
    # Load shedding and readiness (services/chassis/health.py, docs/deploy.md): requests beyond
    # max_inflight get 503 + Retry-After (0: no limit); /ready answers 503 only after shedding
    # without a break for saturation_enter_s, and again 200 after saturation_exit_s without one.
    # Host CPU/memory are never readiness reasons (busy replicas leaving the pool cascade).
    max_inflight: int = 512
    saturation_enter_s: float = 30.0
    saturation_exit_s: float = 10.0
    # One JSON access-log line per request (method, path, status, duration_ms, trace_id).
    access_log: bool = True
    ready_check_timeout_s: float = 2.0
    http_timeout_s: float = 10.0
    # Largest request body a service reads (services/chassis/limits.py); larger ones get 413.
    # Prefixed per service (ORCHESTRATOR_MAX_BODY_BYTES...); routes may set their own (uploads).
    max_body_bytes: int = 10 * 1024 * 1024
    # Shared secret for /internal/* endpoints (services/chassis/internal.py), one for the stack,
    # unprefixed like DATABASE_URL; unset: internal endpoints answer 403.
    internal_token: str | None = Field(default=None, validation_alias=AliasChoices("internal_token",
                                                                                  "INTERNAL_TOKEN"))
    # TLS (docs/security.md): with a PEM certificate (chain) and its key the service serves HTTPS
    # on its port instead of HTTP; prefixed per service (GATEWAY_TLS_CERTFILE, AUTH_TLS_KEYFILE...).
    # require_tls makes a missing certificate or key a start-up error instead of a plain-HTTP
    # service (GATEWAY_REQUIRE_TLS=true for a gateway that must never listen unencrypted).
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    tls_keyfile_password: str | None = None
    require_tls: bool = False

    def require(self, field: str) -> str:
        """A dependency URL the service cannot run without: fail at start with the variable to set."""
        value = getattr(self, field)
        if not value:
            raise RuntimeError(f"{self.service_name} needs {field.upper()} to be set")
        return value


def service_config(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, extra="ignore")
