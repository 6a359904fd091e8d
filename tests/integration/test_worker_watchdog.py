"""A worker whose consumer stalls (Celery's Redis reconnect bug) restarts itself: the detector's
rules, then a real `python -m services.pipeline worker` that consumes another queue while messages
wait in its own, so it looks exactly like a stalled consumer."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis

from services.pipeline.celery_app import KEY_PREFIX, QUEUE
from services.pipeline.watchdog import StallDetector
from services.pipeline.worker_metrics import queue_keys
from tests.conftest import poll


def test_a_stall_is_messages_waiting_none_received_nothing_running_for_the_whole_window():
    d = StallDetector(stall_s=10)
    assert not d.check(0, depth=3, received=0, in_flight=0)   # the window opens
    assert not d.check(9, depth=3, received=0, in_flight=0)
    assert d.check(10, depth=3, received=0, in_flight=0)      # 10 s of waiting messages, none taken

    d = StallDetector(stall_s=10)
    d.check(0, depth=3, received=0, in_flight=0)
    assert not d.check(8, depth=3, received=1, in_flight=0)   # a message arrived: the window restarts
    assert not d.check(17, depth=3, received=1, in_flight=0)
    assert d.check(18, depth=3, received=1, in_flight=0)

    d = StallDetector(stall_s=10)
    for t in range(0, 60, 5):                                  # busy: queued messages are expected
        assert not d.check(t, depth=5, received=0, in_flight=2)
    d = StallDetector(stall_s=10)
    for t in range(0, 60, 5):                                  # an empty queue is never a stall
        assert not d.check(t, depth=0, received=0, in_flight=0)


@pytest.mark.timeout(120)
def test_a_worker_that_takes_nothing_from_a_waiting_queue_restarts_itself(tmp_path, private_redis_url):
    client = redis.Redis.from_url(private_redis_url)
    log_path = tmp_path / "worker.log"
    env = {**os.environ, "REDIS_URL": private_redis_url, "DATABASE_URL": "", "PIPELINE_DATA_DIR": str(tmp_path),
           "PIPELINE_STALL_RESTART_S": "3", "PIPELINE_WORKER_METRICS_PORT": "0",
           "PIPELINE_RECOVERY_SWEEP": "false", "PIPELINE_WORKER_CONCURRENCY": "1"}
    with log_path.open("wb") as out:
        # Consuming only `elsewhere`, the worker never takes what waits in its own queue.
        proc = subprocess.Popen([sys.executable, "-m", "services.pipeline", "worker", "-Q", "elsewhere"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        poll(lambda: b"ready" in log_path.read_bytes(), "the worker ready", timeout=60)
        client.lpush(queue_keys(QUEUE, KEY_PREFIX)[0], b"{}")  # a message nobody takes
        restarts = lambda: log_path.read_bytes().count(b"worker stopped consuming")
        poll(lambda: restarts() >= 2, "the watchdog restarting the worker, twice", timeout=90)
        # Same process (re-executed, not exited): a supervisor sees nothing die.
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert log_path.read_bytes().count(b"ready") >= 2, log_path.read_text()[-3000:]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        client.close()


@pytest.mark.timeout(120)
def test_a_worker_that_stops_unasked_exits_1_and_one_told_to_stop_exits_0(tmp_path, private_redis_url):
    """Celery ends a worker after an "Unrecoverable error" with exit code 0 (seen in CI: kombu 5.7
    crashed restoring unacked messages when Redis dropped), so no restart policy brought it back.
    A stop without a signal (here a remote-control shutdown, the same path) now exits 1; SIGTERM 0."""
    from services.pipeline.celery_app import create_celery
    from services.pipeline.settings import PipelineSettings

    env = {**os.environ, "REDIS_URL": private_redis_url, "DATABASE_URL": "", "PIPELINE_DATA_DIR": str(tmp_path),
           "PIPELINE_STALL_RESTART_S": "0", "PIPELINE_WORKER_METRICS_PORT": "0",
           "PIPELINE_RECOVERY_SWEEP": "false", "PIPELINE_WORKER_CONCURRENCY": "1"}
    app = create_celery(PipelineSettings(redis_url=private_redis_url))
    for how in ("unasked", "sigterm"):
        log_path = tmp_path / f"{how}.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "services.pipeline", "worker"], env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            poll(lambda: b"ready" in log_path.read_bytes(), "the worker ready", timeout=60)
            if how == "unasked":
                # A broadcast reaches only a subscribed control consumer: repeat until it is heard.
                def stopped():
                    app.control.shutdown()
                    try:
                        return [proc.wait(2)]
                    except subprocess.TimeoutExpired:
                        return None
                code = poll(stopped, "the worker stopping", timeout=60, every=0)[0]
            else:
                proc.terminate()
                code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = log_path.read_text()
        if how == "unasked":
            assert code == 1 and "stopped without being asked" in text, text[-2000:]
        else:
            assert code == 0 and "stopped without being asked" not in text, text[-2000:]
