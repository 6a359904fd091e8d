from __future__ import annotations

from services.chassis.settings import ServiceSettings, service_config


class FeaturesSettings(ServiceSettings):
    model_config = service_config("FEATURES_")

    service_name: str = "features"
    port: int = 8004
    # Redis keys: <prefix>online:<view>:<id>, <prefix>newest:<view>. Tests use their own prefix.
    redis_prefix: str = "features:"
    # On start: apply defaults.yaml, seed synthetic customer history if the view is empty, materialise.
    seed_demo: bool = True
    seed_customers: int = 1000
    seed_snapshots: int = 4
    # Registry snapshot cache: other replicas' registry changes show up within this.
    registry_cache_s: float = 5.0
    # Expired online values stay readable as "expired" this long past their TTL, then Redis drops them.
    expired_grace_s: int = 86400
    # Extra margin: incremental materialisation re-reads rows created this long before the horizon
    # of its last run (the horizon already accounts for transactions still open then).
    materialize_lag_s: int = 0
    # How often the freshness gauges are refreshed from Redis (0: never).
    freshness_interval_s: float = 15.0
    max_online_ids: int = 1000
    max_push_rows: int = 10_000
    max_historical_rows: int = 100_000
    # Fernet keys for PII features (docs/privacy.md), comma-separated, newest first; every key
    # decrypts, the first encrypts. Unset: a fixed development key (and a warning).
    pii_keys: str | None = None
