from __future__ import annotations

from services.chassis.settings import ServiceSettings, service_config


class AuthSettings(ServiceSettings):
    model_config = service_config("AUTH_")

    service_name: str = "auth"
    port: int = 8001

    # Access tokens (JWT). The gateway must be configured with the same issuer and audience.
    issuer: str = "aistack-auth"
    audience: str = "aistack"
    signing_alg: str = "RS256"  # RS256 or ES256
    access_ttl_s: int = 900
    # Keys are re-read from Postgres this often, so every replica signs with the newest key.
    key_cache_s: float = 30.0
    # Fernet key (urlsafe base64, 32 bytes) that encrypts private signing keys at rest.
    # Unset: a fixed development key is used and a warning logged -- never in production.
    key_encryption_key: str | None = None

    # Refresh tokens: opaque, rotated on every use.
    refresh_ttl_s: int = 14 * 24 * 3600

    # Brute-force protection: failed logins per window, per account and per client address.
    login_max_failures_per_account: int = 5
    login_max_failures_per_ip: int = 30
    login_window_s: int = 900
    login_lockout_s: int = 900

    # API keys: last_used_at is written at most this often per key.
    api_key_touch_s: int = 60
    # /internal/introspect needs X-Internal-Token: INTERNAL_TOKEN, or this older, separate secret.
    # With neither set it answers 403 (never open).
    introspection_token: str | None = None

    # The first admin, used only while no admin exists.
    bootstrap_admin_email: str | None = None
    bootstrap_admin_password: str | None = None
    allow_registration: bool = False
    # Peers whose X-Forwarded-For is believed (the gateways' addresses), comma-separated CIDRs;
    # empty (the default): the TCP peer is the client. `aistack up` sets 127.0.0.1/32.
    trusted_proxies: str = ""
    default_role: str = "viewer"

    # Revocation (services/auth/revocation.py): entries live access_ttl_s + this margin (which
    # covers the gateways' API-key cache and clock leeway); Redis re-mirrored from Postgres this often.
    revocation_margin_s: int = 120
    revocation_sync_s: float = 2.0
    # Erasure (docs/privacy.md): a service that did not confirm is retried this often, in the
    # request (erase_attempts tries) and then by a background loop until it confirms.
    erase_attempts: int = 3
    erase_retry_s: float = 5.0
    # After the freeze, erasure waits this long for requests already past a gateway's check.
    erase_settle_s: float = 1.0

    # Privacy (docs/privacy.md): the owners' internal APIs that export and erase a data subject's
    # data (called with INTERNAL_TOKEN), and the secret salt of the subject hash in erasure records.
    orchestrator_url: str = "http://127.0.0.1:8002"
    pipeline_url: str = "http://127.0.0.1:9100"
    features_url: str = "http://127.0.0.1:8004"
    subject_timeout_s: float = 60.0
    audit_salt: str | None = None
    # Audit events of other services (Redis stream auth:audit:events) are stored by this loop.
    audit_consumer: bool = True
