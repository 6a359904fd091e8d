"""`python -m services.pipeline` serves the control app; `... worker` runs a Celery worker."""
import sys

from services.chassis.app import run

from .app import create_app
from .settings import PipelineSettings

if __name__ == "__main__":
    settings = PipelineSettings()
    if sys.argv[1:2] == ["worker"]:
        from services.chassis.logs import setup_logging

        from .worker import app as celery

        setup_logging("pipeline", settings.log_level)
        celery.worker_main(["worker", "--loglevel", settings.log_level,
                            "--concurrency", str(settings.worker_concurrency), "-E", *sys.argv[2:]])
    else:
        run(lambda: create_app(settings), settings)
