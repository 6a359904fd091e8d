from __future__ import annotations

from services.chassis.settings import ServiceSettings, service_config


class FeaturesSettings(ServiceSettings):
    model_config = service_config("FEATURES_")

    service_name: str = "features"
    port: int = 8004
