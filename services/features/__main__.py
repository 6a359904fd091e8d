from services.chassis.app import run

from .app import create_app
from .settings import FeaturesSettings

if __name__ == "__main__":
    settings = FeaturesSettings()
    run(lambda: create_app(settings), settings)
