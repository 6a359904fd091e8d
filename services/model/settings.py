from __future__ import annotations

from pathlib import Path

from services.chassis.settings import ServiceSettings, service_config


class ModelSettings(ServiceSettings):
    model_config = service_config("MODEL_")

    service_name: str = "model"
    port: int = 8003
    # Versioned model repository: <repo>/<model>/<version>/manifest.json + artifacts.
    repository: Path = Path("var/models")
