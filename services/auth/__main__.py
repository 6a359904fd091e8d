from services.chassis.app import run

from .app import create_app
from .settings import AuthSettings

if __name__ == "__main__":
    settings = AuthSettings()
    run(lambda: create_app(settings), settings)
