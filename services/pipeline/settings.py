from __future__ import annotations

from services.chassis.settings import ServiceSettings, service_config


class PipelineSettings(ServiceSettings):
    model_config = service_config("PIPELINE_")

    service_name: str = "pipeline"
    # The control app (health, readiness, metrics) of the worker fleet.
    port: int = 9100
    model_url: str = "http://127.0.0.1:8003"
    features_url: str = "http://127.0.0.1:8004"
    worker_concurrency: int = 2
