"""Graceful shutdown of a real uvicorn process: on SIGTERM /ready turns 503, the request in flight
finishes with its answer, then the process exits.

The server is a chassis app with two test-only routes, served by services.chassis.app.run (what
every service's __main__ calls) in its own process. The slow request holds until the test
releases it, so the order of events is fixed by the test, not by the clock.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def serve() -> None:
    """Entry point of the server process: python -c 'from tests.integration.test_shutdown import serve; serve()'."""
    from fastapi import FastAPI

    from services.chassis.app import create_service_app, run
    from services.chassis.settings import ServiceSettings

    started, release = Path(os.environ["TEST_STARTED_FILE"]), Path(os.environ["TEST_RELEASE_FILE"])
    settings = ServiceSettings(service_name="shutdown-test", port=int(os.environ["TEST_PORT"]))

    def factory() -> FastAPI:
        app = create_service_app(settings, title="aistack shutdown test")

        @app.get("/slow")
        async def slow() -> dict:
            started.touch()
            while not release.exists():
                await asyncio.sleep(0.02)
            return {"done": True}

        return app

    run(factory, settings)


def _wait_for(predicate, what: str, proc: subprocess.Popen, log: Path, limit: float = 60.0):
    """Poll until predicate() is truthy; the limit only stops a broken run from hanging."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None and what != "exit":
            pytest.fail(f"server exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"gave up waiting for {what}:\n{log.read_text()}")


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


def test_sigterm_drains_then_finishes_the_request_in_flight_then_exits(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    started, release, log = tmp_path / "started", tmp_path / "release", tmp_path / "server.log"
    # The drain lasts until the test has seen /ready say 503; the test never waits it out.
    env = {**os.environ, "TEST_PORT": str(port), "TEST_STARTED_FILE": str(started),
           "TEST_RELEASE_FILE": str(release), "SHUTDOWN_DRAIN_S": "3", "SHUTDOWN_TIMEOUT_S": "60",
           "OTEL_EXPORTER_OTLP_ENDPOINT": "", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", "from tests.integration.test_shutdown import serve; serve()"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _status(f"{base}/ready") == 200, "ready", proc, log)

        answer: dict = {}

        def slow_request():
            try:
                r = httpx.get(f"{base}/slow", timeout=120)
                answer.update(status=r.status_code, body=r.json())
            except httpx.HTTPError as exc:  # recorded for the assertion below
                answer.update(error=repr(exc))

        client = threading.Thread(target=slow_request)
        client.start()
        _wait_for(started.exists, "the slow request to be in flight", proc, log)

        proc.send_signal(signal.SIGTERM)
        # Draining: still answering, but not ready, so a load balancer stops sending new work.
        r = httpx.get(f"{base}/ready", timeout=5)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "shutting_down" and r.headers["retry-after"]
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200

        # After the drain the listener closes; the slow request is still in flight and unanswered.
        _wait_for(lambda: _status(f"{base}/health") is None, "the listener to close", proc, log)
        assert proc.poll() is None and client.is_alive() and not answer

        release.touch()
        client.join(60)
        assert answer == {"status": 200, "body": {"done": True}}, answer
        _wait_for(lambda: proc.poll() is not None, "exit", proc, log)
        # uvicorn re-raises the signal it caught once it has shut down cleanly.
        assert proc.returncode in (0, -signal.SIGTERM), log.read_text()
    finally:
        release.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
