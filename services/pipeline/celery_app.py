"""The Celery app on the Redis broker, configured so that accepted work is never lost."""
from __future__ import annotations

import importlib.util
import logging

from celery import Celery
from celery.signals import beat_init, worker_process_init, worker_ready

from .settings import PipelineSettings

log = logging.getLogger("aistack.pipeline")
KEY_PREFIX = "pipeline:"
QUEUE = "celery"
DEFAULT_PRIORITY = 6
TASK_MODULES = ["services.pipeline.tasks", "services.pipeline.tasks_monitoring", "services.pipeline.tasks_training"]
# The feature store's materialisation task, when its module is present.
FEATURE_TASKS = "services.pipeline.tasks_features"


def _has_feature_tasks() -> bool:
    try:
        return importlib.util.find_spec(FEATURE_TASKS) is not None
    except ImportError:
        return False


def beat_schedule(settings: PipelineSettings) -> dict:
    schedule = {
        "persist-prediction-log": {"task": "pipeline.persist_logs", "schedule": settings.persist_every_s},
        "model-quality": {"task": "pipeline.compute_quality", "schedule": settings.quality_every_s},
        "feature-drift": {"task": "pipeline.compute_drift", "schedule": settings.drift_every_s},
        # The lease reaper (docs/pipeline.md): re-queues chunks whose worker died.
        "reap-expired-leases": {"task": "pipeline.reap", "schedule": settings.reap_every_s},
    }
    if _has_feature_tasks():
        schedule["materialize-features"] = {"task": "pipeline.materialize_features",
                                            "schedule": settings.materialize_every_s}
    # A periodic run that waited longer than its interval is superseded by the next: expire it.
    for entry in schedule.values():
        entry["options"] = {"expires": float(entry["schedule"])}
    # The reaper jumps the backlog it exists to rescue (priority 0 is served first) and survives
    # a wait for a free pool process.
    schedule["reap-expired-leases"]["options"] = {"expires": max(30.0, 3 * settings.reap_every_s), "priority": 0}
    return schedule


class TaskDataFilter(logging.Filter):
    """Celery's task lines (received, succeeded, retry, failed) carry the task's arguments and
    return value, which name jobs (subject data, docs/privacy.md): keep the task's name and id,
    hide the rest, so erasure never has to search the worker's logs."""

    HIDDEN = ("args", "kwargs", "return_value")

    def _scrub(self, value):
        if isinstance(value, dict) and any(k in value for k in self.HIDDEN):
            return {k: "[hidden]" if k in self.HIDDEN else v for k, v in value.items()}
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        record.args = self._scrub(record.args)
        if hasattr(record, "data"):
            record.data = self._scrub(record.data)
        return True


def _hide_task_data() -> None:
    for name in ("celery.app.trace", "celery.worker.strategy", "celery.worker.request"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, TaskDataFilter) for f in logger.filters):
            logger.addFilter(TaskDataFilter())


def create_celery(settings: PipelineSettings) -> Celery:
    broker = settings.require("redis_url")
    _hide_task_data()
    include = TASK_MODULES + ([FEATURE_TASKS] if _has_feature_tasks() else [])
    app = Celery("aistack", broker=broker, backend=broker, include=include)
    app.conf.update(
        # Ack after the task finishes and requeue it if the worker dies: a SIGKILL loses nothing.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A task unacked this long is redelivered; longer than any chunk takes. The recovery sweep
        # at worker start re-queues unfinished chunks sooner (tasks are idempotent).
        # Socket timeouts: a frozen Redis makes a publish fail in seconds, not hang a request.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                                  "global_keyprefix": KEY_PREFIX, "socket_timeout": 5,
                                  "socket_connect_timeout": 5},
        result_backend_transport_options={"global_keyprefix": KEY_PREFIX},
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 1},
        # New work waits behind recovered work: the reaper re-queues at priority 0, which kombu's
        # Redis transport serves first (its priority steps 0, 3, 6, 9).
        task_default_priority=DEFAULT_PRIORITY,
        # Pool children log through our JSON handler on the real stdout (Celery's redirect would
        # swallow them: the handler would write into Celery's logging proxy).
        worker_redirect_stdouts=False,
        # Batch job tasks store no result (ignore_result, tasks.py): a job's state lives in
        # Postgres, where erasure finds it; results of the other tasks expire after a day.
        result_expires=86400,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_track_started=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        beat_schedule=beat_schedule(settings),
        beat_max_loop_interval=5,
    )
    app.conf.aistack_settings = settings
    # Publishing side of trace propagation: whoever sends a task (an API request, beat) puts its
    # trace context into the task headers; the worker continues it (see _init_worker).
    from services.chassis.telemetry import instrument_celery

    instrument_celery()
    return app


@worker_process_init.connect
def _init_worker(**_):
    """Each forked worker process gets its own tracer pipeline and logging."""
    from services.chassis.logs import setup_logging
    from services.chassis.telemetry import setup_tracing

    # The level the worker's main process set up (PIPELINE_LOG_LEVEL), inherited through the fork;
    # httpx's line per model request would drown the task lines.
    setup_logging("pipeline", logging.getLevelName(logging.getLogger().getEffectiveLevel()))
    logging.getLogger("httpx").setLevel(logging.WARNING)
    setup_tracing("pipeline")
    from services.chassis.telemetry import instrument_celery

    instrument_celery()


@beat_init.connect
def _init_beat(**_):
    """Beat publishes scheduled tasks: each one starts a trace that the worker continues."""
    from services.chassis.telemetry import setup_tracing

    setup_tracing("pipeline-beat")


@worker_ready.connect
def _recovery_sweep(sender=None, **_):
    """A starting worker runs the reaper's sweep at once (chunks of a dead worker whose lease
    expired), instead of waiting for the next beat or the broker's visibility timeout."""
    app = sender.app if sender is not None else None
    settings = getattr(app.conf, "aistack_settings", None) if app else None
    if settings is None or not settings.recovery_sweep or not settings.database_url:
        return
    try:
        app.send_task("pipeline.recover")
    except Exception:  # the sweep is an optimisation; the visibility timeout still holds
        log.exception("could not queue the recovery sweep")
