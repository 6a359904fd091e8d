"""e2e fixtures: credentials for the stack's gateway, and extra service processes (replicas)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import free_port


def login(gateway_url: str, email: str, password: str) -> httpx.Response:
    return httpx.post(f"{gateway_url}/v1/auth/token", data={"username": email, "password": password}, timeout=30)


@pytest.fixture(scope="module")
def admin_tokens(stack) -> dict:
    """Log in as the stack's first admin (AUTH_BOOTSTRAP_ADMIN_* or the generated development admin)."""
    r = login(stack.url("gateway"), stack.admin_email, stack.admin_password)
    assert r.status_code == 200, f"the stack's admin cannot log in: {r.text}"
    return r.json()


@pytest.fixture(scope="module")
def admin_headers(admin_tokens) -> dict:
    return {"Authorization": f"Bearer {admin_tokens['access_token']}"}


class Replicas:
    """Extra service processes next to the stack (more gateway or orchestrator replicas)."""

    def __init__(self, stack):
        self.stack = stack
        self.procs: list[subprocess.Popen] = []

    def start(self, service: str, env: dict[str, str]) -> tuple[str, subprocess.Popen]:
        base = next(p.env for p in self.stack.procs if p.name == service)
        port = free_port()
        prefix = service.upper() + "_"
        log = (self.stack.data_dir / "logs" / f"{service}-{port}.log").open("ab")
        popen = subprocess.Popen([sys.executable, "-m", f"services.{service}"],
                                 env={**base, **env, f"{prefix}PORT": str(port)},
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(popen)
        url = f"http://{self.stack.host}:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert popen.poll() is None, f"{service} replica exited with {popen.returncode}"
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    return url, popen
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{service} replica on {port} not ready"
            time.sleep(0.2)

    @staticmethod
    def kill(popen: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(popen.pid, sig)
        except ProcessLookupError:
            pass
        popen.wait(15)

    def stop(self) -> None:
        for popen in self.procs:
            if popen.poll() is None:
                self.kill(popen, signal.SIGTERM)


@pytest.fixture(scope="module")
def replicas(stack):
    r = Replicas(stack)
    yield r
    r.stop()
