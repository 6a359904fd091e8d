from __future__ import annotations

from pydantic import AliasChoices, Field

from services.chassis.settings import ServiceSettings, service_config


def _urls(value: str) -> list[str]:
    return [u.strip().rstrip("/") for u in value.split(",") if u.strip()]


class GatewaySettings(ServiceSettings):
    model_config = service_config("GATEWAY_")

    service_name: str = "gateway"
    port: int = 8000
    # Comma-separated replica URLs per upstream; requests are balanced over them.
    orchestrator_urls: str = "http://127.0.0.1:8002"
    auth_urls: str = Field("http://127.0.0.1:8001", validation_alias=AliasChoices(
        "auth_urls", "GATEWAY_AUTH_URLS", "GATEWAY_AUTH_URL"))
    features_urls: str = Field("http://127.0.0.1:8004", validation_alias=AliasChoices(
        "features_urls", "GATEWAY_FEATURES_URLS", "GATEWAY_FEATURES_URL"))
    # The pipeline's control app (job API, quality/drift/training admin) and the model servers
    # (not routed publicly; the admin overview reads their repository, health and metrics).
    pipeline_urls: str = Field("http://127.0.0.1:9100", validation_alias=AliasChoices(
        "pipeline_urls", "GATEWAY_PIPELINE_URLS", "GATEWAY_PIPELINE_URL"))
    model_urls: str = Field("http://127.0.0.1:8003", validation_alias=AliasChoices(
        "model_urls", "GATEWAY_MODEL_URLS", "GATEWAY_MODEL_URL"))
    # A replica that fails this many times in a row sits out for eject_s seconds, then is re-admitted.
    eject_after_failures: int = 3
    eject_s: float = 10.0
    # Idempotent requests (and any request that never reached a replica) are retried this many
    # times, each on another replica.
    retries: int = 1
    upstream_timeout_s: float = 30.0
    max_body_bytes: int = 1_048_576
    max_upload_bytes: int = 2 * 1024**3

    # Access tokens, verified locally against auth's JWKS.
    jwt_issuer: str = "aistack-auth"
    jwt_audience: str = "aistack"
    jwt_algorithms: str = "RS256,ES256"
    jwt_leeway_s: int = 10
    jwks_cache_s: float = 300.0
    # An unknown kid refetches the JWKS, but never more often than this.
    jwks_min_refetch_s: float = 5.0
    # API keys: introspection answers cached in Redis; a revocation takes effect within this TTL.
    api_key_cache_ttl_s: float = 30.0
    api_key_negative_cache_ttl_s: float = 5.0
    # Sent to auth's /internal/introspect; unset: INTERNAL_TOKEN (the stack's shared secret).
    introspection_token: str | None = None
    # Auth's revocations (docs/security.md) are followed over Redis pub/sub; if the subscription
    # has been down this long, authenticated requests answer 503 (fail closed).
    revocation_grace_s: float = 3.0
    # Failed authentications (bad token, bad or revoked key) per client address per minute, shared
    # by the replicas; over it the address gets 429 before any lookup at auth.
    auth_failures_per_minute: int = 30

    # Token-bucket rate limits per principal, global across replicas (Redis).
    rate_limit_enabled: bool = True
    # Requests per minute by role; an API key's own rate_limit_rpm wins over its role's.
    rate_limit_rpm: dict[str, int] = {"admin": 1200, "developer": 600, "service": 3000, "viewer": 120}  # noqa: RUF012
    rate_limit_default_rpm: int = 300
    # Unauthenticated routes (login, JWKS): per client address.
    rate_limit_anonymous_rpm: int = 300
    # Input tokens per minute on /v1/embeddings, by role.
    rate_limit_tpm: dict[str, int] = {"admin": 1_000_000, "developer": 200_000, "service": 1_000_000,  # noqa: RUF012
                                      "viewer": 20_000}
    rate_limit_default_tpm: int = 100_000
    # Redis down: let requests through (counted in aistack_gateway_ratelimit_redis_errors_total)
    # or answer 503.
    rate_limit_fail_open: bool = True
    # Admin overview: every service replica's /metrics, /ready and version scraped this often,
    # kept for this long in memory (per gateway process); the summary covers the last summary_s.
    overview_scrape_s: float = 5.0
    overview_window_s: float = 300.0
    overview_summary_s: float = 60.0
    # Serve the admin web page at /admin/.
    admin_ui: bool = True

    # Load balancers in front of the gateway whose X-Forwarded-For is believed, comma-separated
    # CIDRs; empty (the default): the TCP peer is the client. The client address is the right-most
    # X-Forwarded-For entry that is not one of these (services/chassis/clientip.py).
    trusted_proxies: str = ""
    # Operators may read /metrics with X-Internal-Token (Prometheus) or an admin credential;
    # API docs (/docs, /openapi.json) are served to admins only. Nothing of it is public.

    @property
    def orchestrator_replicas(self) -> list[str]:
        return _urls(self.orchestrator_urls)

    @property
    def auth_replicas(self) -> list[str]:
        return _urls(self.auth_urls)

    @property
    def features_replicas(self) -> list[str]:
        return _urls(self.features_urls)

    @property
    def pipeline_replicas(self) -> list[str]:
        return _urls(self.pipeline_urls)

    @property
    def model_replicas(self) -> list[str]:
        return _urls(self.model_urls)

    @property
    def algorithms(self) -> list[str]:
        return [a.strip() for a in self.jwt_algorithms.split(",") if a.strip()]
