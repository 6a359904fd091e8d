"""The module `celery -A services.pipeline.worker` loads: the app built from the environment."""
from .celery_app import create_celery
from .settings import PipelineSettings

app = create_celery(PipelineSettings())
