from __future__ import annotations

from services.chassis.settings import ServiceSettings, service_config


class GatewaySettings(ServiceSettings):
    model_config = service_config("GATEWAY_")

    service_name: str = "gateway"
    port: int = 8000
    # Comma-separated replica URLs; requests are balanced over them.
    orchestrator_urls: str = "http://127.0.0.1:8002"
    auth_url: str = "http://127.0.0.1:8001"
    features_url: str = "http://127.0.0.1:8004"
    # A replica that fails this many times in a row sits out for eject_s seconds.
    eject_after_failures: int = 3
    eject_s: float = 10.0

    @property
    def orchestrator_replicas(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.orchestrator_urls.split(",") if u.strip()]
