"""The Celery app on the Redis broker, configured so that accepted work is never lost."""
from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

from .settings import PipelineSettings


def create_celery(settings: PipelineSettings) -> Celery:
    broker = settings.require("redis_url")
    app = Celery("aistack", broker=broker, backend=broker, include=["services.pipeline.tasks"])
    app.conf.update(
        # Ack after the task finishes and requeue it if the worker dies: a SIGKILL loses nothing.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A task unacked this long is redelivered; longer than any chunk takes.
        broker_transport_options={"visibility_timeout": 3600, "global_keyprefix": "pipeline:"},
        result_backend_transport_options={"global_keyprefix": "pipeline:"},
        result_expires=86400,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_track_started=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    app.conf.aistack_settings = settings
    return app


@worker_process_init.connect
def _init_worker(**_):
    """Each forked worker process gets its own tracer pipeline and logging."""
    from services.chassis.logs import setup_logging
    from services.chassis.telemetry import setup_tracing

    setup_logging("pipeline")
    setup_tracing("pipeline")
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    CeleryInstrumentor().instrument()
