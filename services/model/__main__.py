from services.chassis.app import run

from .app import create_app
from .settings import ModelSettings

if __name__ == "__main__":
    settings = ModelSettings()
    run(lambda: create_app(settings), settings)
