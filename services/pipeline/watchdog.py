"""A worker that stopped consuming restarts itself.

Celery's Redis transport has a recurring bug (celery#8030, #9054, #10205, #10302, still reported
in 2026): after the broker connection drops and comes back, the worker reconnects, logs that it is
connected, and never takes another message. Beat keeps queueing, the queue grows, jobs and the
prediction log wait forever, and the process looks alive to every probe.

The watchdog runs in the worker's main process. A stall is: messages waiting in the queue at every
check for `stall_s`, not one message received in that time, and nothing running or reserved (a busy
worker legitimately leaves messages in the queue). Then the worker re-executes itself (same pid, so
a supervisor, `aistack up` or the kubelet sees no exit) after Celery's warm shutdown, which is
safe because nothing is in flight.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("aistack.pipeline.watchdog")


class StallDetector:
    """Pure decision: fed (now, queue depth, messages received so far, in-flight tasks) at each check."""

    def __init__(self, stall_s: float):
        self.stall_s = stall_s
        self.since: float | None = None  # when the current stall window began
        self.received_at_start = 0

    def check(self, now: float, depth: int, received: int, in_flight: int) -> bool:
        if depth <= 0 or in_flight > 0 or (self.since is not None and received != self.received_at_start):
            self.since = None  # the queue drained, work runs, or a message arrived: not stalled
        if depth <= 0 or in_flight > 0:
            return False
        if self.since is None:
            self.since, self.received_at_start = now, received
            return False
        return now - self.since >= self.stall_s


class Watchdog:
    def __init__(self, stall_s: float, depth: Callable[[], int], in_flight: Callable[[], int],
                 restart: Callable[[], None], interval_s: float | None = None):
        self.detector = StallDetector(stall_s)
        self.depth, self.in_flight, self.restart = depth, in_flight, restart
        self.interval_s = interval_s or max(1.0, stall_s / 6)
        self.received = 0
        self.stop = threading.Event()

    def on_received(self, **_) -> None:
        self.received += 1

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                depth = self.depth()
            except Exception as exc:  # noqa: BLE001 - the broker is down: the consumer's own retry handles it
                log.debug("watchdog: queue depth unavailable: %s", exc)
                self.detector.since = None
                continue
            if self.detector.check(time.monotonic(), depth, self.received, self.in_flight()):
                log.error("worker stopped consuming: messages wait in the queue and none was received; "
                          "restarting the worker", extra={"queue_depth": depth,
                                                          "stalled_s": self.detector.stall_s})
                self.restart()
                return


def _reexec() -> None:
    """Replace this process with a fresh worker (same command line, same pid)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execv(sys.executable, [sys.executable, "-m", "services.pipeline", *sys.argv[1:]])


def _restart(grace_s: float = 60.0) -> None:
    """Celery's warm shutdown (pool children and embedded beat stop), then re-exec at exit; if the
    shutdown itself hangs on the broken consumer, re-exec after grace_s anyway."""
    atexit.register(_reexec)  # registered last, runs first: before the metrics dir is removed
    timer = threading.Timer(grace_s, _reexec)
    timer.daemon = True
    timer.start()
    os.kill(os.getpid(), signal.SIGTERM)


def start(settings) -> Watchdog | None:
    """In the main process of a worker started by `python -m services.pipeline worker` (never in
    an embedded test worker: it re-executes its process); None when stall_restart_s is 0."""
    if not settings.stall_restart_s or not settings.redis_url:
        return None
    import redis
    from celery import signals
    from celery.worker import state

    from .celery_app import KEY_PREFIX, QUEUE
    from .worker_metrics import queue_keys

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    keys = queue_keys(QUEUE, KEY_PREFIX)

    def depth() -> int:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.llen(key)
        return int(sum(pipe.execute()))

    dog = Watchdog(settings.stall_restart_s, depth,
                   lambda: len(state.active_requests) + len(state.reserved_requests), _restart)
    signals.task_received.connect(dog.on_received, weak=False)
    threading.Thread(target=dog.run, daemon=True, name="consumer-watchdog").start()
    return dog
