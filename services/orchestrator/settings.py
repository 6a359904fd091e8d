from __future__ import annotations

from pydantic import AliasChoices, Field

from services.chassis.settings import ServiceSettings, service_config


class OrchestratorSettings(ServiceSettings):
    model_config = service_config("ORCHESTRATOR_")

    service_name: str = "orchestrator"
    port: int = 8002
    # Comma-separated model server replicas; an inference that fails on one is retried on another.
    model_urls: str = Field("http://127.0.0.1:8003", validation_alias=AliasChoices(
        "model_urls", "ORCHESTRATOR_MODEL_URLS", "ORCHESTRATOR_MODEL_URL"))
    features_url: str = "http://127.0.0.1:8004"
    # Model metadata (input names and types) changes only on deploys; refresh it this often.
    metadata_ttl_s: float = 30.0
    max_batch_rows: int = 1000
    # The prediction stream is bounded; the pipeline persists it long before this many entries.
    prediction_log_maxlen: int = 1_000_000
    # How long a prediction id accepts feedback.
    feedback_window_s: int = 7 * 86400
    policy_reload_s: float = 30.0

    @property
    def model_replicas(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.model_urls.split(",") if u.strip()]
