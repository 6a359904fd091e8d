from __future__ import annotations

from services.chassis.settings import ServiceSettings, service_config


class OrchestratorSettings(ServiceSettings):
    model_config = service_config("ORCHESTRATOR_")

    service_name: str = "orchestrator"
    port: int = 8002
    model_url: str = "http://127.0.0.1:8003"
    features_url: str = "http://127.0.0.1:8004"
    # Model metadata (input names and types) changes only on deploys; refresh it this often.
    metadata_ttl_s: float = 30.0
    max_batch_rows: int = 1000
