from __future__ import annotations

from services.chassis.settings import ServiceSettings, service_config


class AuthSettings(ServiceSettings):
    model_config = service_config("AUTH_")

    service_name: str = "auth"
    port: int = 8001
