"""Prometheus metrics of the Celery worker: tasks by state, durations, queue depth.

Prefork workers run tasks in child processes, so counters use prometheus_client's multiprocess
mode: `prepare()` must run before anything imports prometheus_client (services.pipeline.__main__
calls it first). The main process serves every process's samples plus the broker's queue depth.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time

log = logging.getLogger("aistack.pipeline.metrics")
ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare() -> str:
    """Point prometheus_client at a fresh directory shared with the forked children."""
    path = os.environ.get(ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="aistack-worker-metrics-")
        os.environ[ENV] = path
        pid = os.getpid()
        atexit.register(lambda: os.getpid() == pid and shutil.rmtree(path, ignore_errors=True))
    return path


def _metrics():
    from prometheus_client import Counter, Histogram

    global TASKS, DURATION
    TASKS = Counter("aistack_pipeline_tasks_total", "Celery tasks by name and state", ["task", "state"])
    DURATION = Histogram("aistack_pipeline_task_duration_seconds", "Task run time", ["task", "state"],
                         buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900))


TASKS = DURATION = None
_started: dict[str, float] = {}


def queue_keys(queue: str = "celery", prefix: str = "pipeline:") -> list[str]:
    """The Redis lists of one Celery queue: kombu keeps one list per priority step."""
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    sep = Channel.sep
    return [prefix + (queue if step == 0 else f"{queue}{sep}{step}") for step in PRIORITY_STEPS]


class BrokerCollector:
    """Queue depth (LLEN) and unacked messages, read from the broker at scrape time."""

    def __init__(self, redis_url: str, queue: str = "celery", prefix: str = "pipeline:"):
        import redis

        self.redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.queue, self.prefix = queue, prefix

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily("aistack_pipeline_queue_depth", "Messages waiting in the broker queue",
                                  labels=["queue"])
        unacked = GaugeMetricFamily("aistack_pipeline_unacked_messages",
                                    "Messages delivered to a worker and not yet acknowledged")
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key in queue_keys(self.queue, self.prefix):
                pipe.llen(key)
            pipe.zcard(self.prefix + "unacked_index")
            *lens, n_unacked = pipe.execute()
            depth.add_metric([self.queue], float(sum(lens)))
            unacked.add_metric([], float(n_unacked))
        except Exception as exc:  # noqa: BLE001 - a scrape never fails because the broker is down
            log.warning("broker metrics unavailable: %s", exc)
            return
        yield depth
        yield unacked


def start_server(port: int, redis_url: str | None) -> bool:
    """Serve metrics from the worker's main process; a taken port is logged, not fatal."""
    if not port:
        return False
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    if redis_url:
        registry.register(BrokerCollector(redis_url))
    try:
        start_http_server(port, registry=registry)
    except OSError as exc:
        log.warning("worker metrics port %s unavailable: %s", port, exc)
        return False
    log.info("worker metrics on port %s", port)
    return True


def connect_signals() -> None:
    """Count tasks by state and time them, in whichever process runs them."""
    from celery import signals

    _metrics()

    @signals.task_received.connect(weak=False)
    def _received(request=None, **_):
        TASKS.labels(getattr(request, "name", "unknown") or "unknown", "received").inc()

    @signals.task_prerun.connect(weak=False)
    def _prerun(task_id=None, task=None, **_):
        _started[task_id] = time.perf_counter()
        TASKS.labels(task.name, "started").inc()

    @signals.task_postrun.connect(weak=False)
    def _postrun(task_id=None, task=None, state=None, **_):
        state = (state or "unknown").lower()
        TASKS.labels(task.name, state).inc()
        start = _started.pop(task_id, None)
        if start is not None:
            DURATION.labels(task.name, state).observe(time.perf_counter() - start)

    @signals.task_rejected.connect(weak=False)
    def _rejected(message=None, **_):
        TASKS.labels("unknown", "rejected").inc()

    @signals.task_revoked.connect(weak=False)
    def _revoked(request=None, **_):
        TASKS.labels(getattr(request, "name", "unknown") or "unknown", "revoked").inc()

    @signals.worker_process_shutdown.connect(weak=False)
    def _dead(pid=None, **_):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())
