from services.chassis.app import run

from .app import create_app
from .settings import OrchestratorSettings

if __name__ == "__main__":
    settings = OrchestratorSettings()
    run(lambda: create_app(settings), settings)
