from services.chassis.app import run

from .app import create_app
from .settings import GatewaySettings

if __name__ == "__main__":
    settings = GatewaySettings()
    run(lambda: create_app(settings), settings)
