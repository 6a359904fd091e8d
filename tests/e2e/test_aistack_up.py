"""`aistack up` as a new user runs it (issue 17): a fresh data dir, embedded PostgreSQL and Redis,
models built on the spot. One real `aistack up` process serves the module:

- 17.4 a clean start says nothing an operator would have to judge (no ERROR/WARNING anywhere);
- 17.5 the README's walkthrough, run command by command against it (tests/e2e/readme.py);
- 17.6 `aistack logs --trace-id` follows one prediction through every service it crossed;
- 17.2 a second `aistack up` on the same data dir, or on taken ports, exits at once with one
  line and touches nothing; `aistack status` and `aistack down` manage the running one.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.cli.stack import DEFAULT_PORTS
from tests.conftest import poll
from tests.e2e import readme

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
AISTACK = [sys.executable, "-c", "from services.cli import main; main()"]
SERVICES = ("gateway", "auth", "orchestrator", "model", "features", "pipeline")


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is free
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_offset() -> int:
    """An offset that moves every default port (and the worker's metrics port) onto free ones."""
    for offset in range(20000, 40000, 137):
        if all(_free(p + offset) for p in (*DEFAULT_PORTS.values(), DEFAULT_PORTS["pipeline"] + 1)):
            return offset
    pytest.fail("no free block of ports")


def clean_env() -> dict[str, str]:
    """A new user's shell: no datastore URLs, no bootstrap admin, no secrets."""
    drop = ("DATABASE_URL", "REDIS_URL", "INTERNAL_TOKEN", "OTEL_")
    return {k: v for k, v in os.environ.items()
            if not k.startswith(drop) and not k.startswith(tuple(f"{s.upper()}_" for s in SERVICES))}


def aistack(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*AISTACK, *args], check=False, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


class Up:
    def __init__(self, data_dir: Path, offset: int):
        self.data_dir, self.offset = data_dir, offset
        self.output = data_dir.parent / "aistack-up.out"
        self.proc = subprocess.Popen([*AISTACK, "up", "--data-dir", str(data_dir), "--port-offset", str(offset)],
                                     cwd=ROOT, env=clean_env(), stdout=self.output.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{DEFAULT_PORTS[service] + self.offset}"

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def started(self) -> bool:
        assert self.proc.poll() is None, f"aistack up exited {self.proc.returncode}:\n{self.text()}"
        return "Ctrl-C to stop" in self.text()

    def admin(self) -> tuple[str, str]:
        match = re.search(r"development admin: (\S+)\s+password: (\S+)", self.text())
        assert match, self.text()
        return match.group(1), match.group(2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("aistack-up") / "var"
    running = Up(data_dir, free_offset())
    try:
        poll(running.started, "aistack up to print its URLs", timeout=900, every=1.0)
        yield running
    finally:
        running.stop()


def service_lines(up: Up) -> dict[str, list[str]]:
    return {p.stem: p.read_text(errors="replace").splitlines() for p in (up.data_dir / "logs").glob("*.log")}


# -- 17.4: a quiet clean start ----------------------------------------------------------------------
def test_a_clean_start_has_no_error_or_warning_anywhere(up):
    noisy = re.compile(r"\b(ERROR|WARNING|CRITICAL|Traceback)\b|it/s\]|Warning:")
    cli = [line for line in up.text().splitlines() if noisy.search(line)]
    assert not cli, "aistack up printed:\n" + "\n".join(cli)
    logs = service_lines(up)
    assert set(logs) >= {"gateway", "auth", "orchestrator", "model", "features", "pipeline", "worker"}
    for name, lines in logs.items():
        bad = [line for line in lines if noisy.search(line)]
        assert not bad, f"{name}.log:\n" + "\n".join(bad[:10])


# -- 17.5: the README walkthrough -------------------------------------------------------------------
def test_readme_walkthrough_runs_as_written(up):
    email, password = up.admin()
    steps = readme.walkthrough((ROOT / "README.md").read_text())
    assert len(steps) >= 8, "the README lost its walkthrough blocks"
    assert any(email in step.command for step in steps), f"the README signs in as someone else than {email}"
    ports = {str(p): str(p + up.offset) for p in DEFAULT_PORTS.values()}
    readme.run(steps, env=clean_env(), ports=ports, cwd=up.data_dir.parent,
               placeholders={"<the password aistack up printed>": password})


# -- 17.6: one trace across the services' logs ------------------------------------------------------
def test_aistack_logs_follows_one_prediction_through_every_service(up):
    email, password = up.admin()
    gw = up.url("gateway")
    token = httpx.post(f"{gw}/v1/auth/token", data={"username": email, "password": password},
                       timeout=30).json()["access_token"]
    r = httpx.post(f"{gw}/v1/predict/fraud", headers={"Authorization": f"Bearer {token}",
                                                      "Cache-Control": "no-cache"},
                   json={"inputs": {"customer_id": "C0042", "amount": 77.5}}, timeout=60)
    assert r.status_code == 200, r.text
    trace_id = r.headers["x-trace-id"]

    def traced_services() -> set[str]:
        out = aistack("logs", "--data-dir", str(up.data_dir), "--trace-id", trace_id, "--json")
        assert out.returncode == 0, out.stderr
        return {json.loads(line)["service"] for line in out.stdout.splitlines()}

    # gateway -> orchestrator -> features and model: each logs the request it served.
    seen = poll(lambda: traced_services() >= {"gateway", "orchestrator", "features", "model"} and traced_services(),
                "every service's log lines of the trace")
    assert seen <= set(SERVICES) | {"pipeline-worker"}

    out = aistack("logs", "--data-dir", str(up.data_dir), "--trace-id", trace_id)
    times = [line.split(" ", 2)[:2] for line in out.stdout.splitlines()]
    assert times == sorted(times), "lines are not in time order"

    follow = subprocess.Popen([*AISTACK, "logs", "--data-dir", str(up.data_dir), "--follow", "--service",
                               "gateway", "--json"], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, text=True)
    try:
        marker = httpx.get(f"{gw}/v1/predict/does-not-exist", headers={"Authorization": f"Bearer {token}"},
                           timeout=30).headers.get("x-trace-id")
        assert marker
        deadline, record = time.monotonic() + 60, {}
        for line in follow.stdout:
            record = json.loads(line)
            assert record["service"] == "gateway"
            if record.get("trace_id") == marker or time.monotonic() > deadline:
                break
        assert record.get("trace_id") == marker, "--follow did not show the new request's line"
    finally:
        follow.terminate()
        follow.wait()


# -- 17.2: one owner per data dir -------------------------------------------------------------------
def test_status_names_the_running_stack(up):
    out = aistack("status", "--data-dir", str(up.data_dir), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["running"] and info["pid"] == up.proc.pid
    assert info["urls"]["gateway"] == up.url("gateway")
    assert set(info["ready"].values()) == {"ready"}, info["ready"]


def test_second_up_on_the_same_data_dir_is_refused_and_touches_nothing(up):
    before = {p: p.stat().st_mtime_ns for p in up.data_dir.rglob("*") if p.is_file() and "logs" not in p.parts}
    out = aistack("up", "--data-dir", str(up.data_dir), "--port-offset", str(up.offset + 1))
    assert out.returncode == 1
    message = out.stderr.strip()
    assert "\n" not in message and "Traceback" not in out.stderr + out.stdout, out.stderr
    assert f"pid {up.proc.pid}" in message and up.url("gateway") in message, message
    # The first stack keeps its databases and answers.
    assert httpx.get(f"{up.url('gateway')}/ready", timeout=10).status_code == 200
    after = {p: p.stat().st_mtime_ns for p in up.data_dir.rglob("*") if p.is_file() and "logs" not in p.parts}
    # What the running stack itself keeps writing (server logs, the database files, beat's
    # schedule) may change meanwhile; everything else must be exactly as it was.
    changed = {p for p in before if after.get(p) != before[p]
               and "pgdata" not in p.parts and p.suffix != ".log" and not p.name.startswith("celerybeat-schedule")}
    assert not changed, changed


def test_up_on_a_taken_port_says_so_in_one_line(up, tmp_path):
    out = aistack("up", "--data-dir", str(tmp_path / "other"), "--port-offset", str(up.offset))
    assert out.returncode == 1
    message = out.stderr.strip()
    assert "\n" not in message and "Traceback" not in out.stderr + out.stdout, out.stderr
    assert "already in use" in message and str(DEFAULT_PORTS["gateway"] + up.offset) in message
    assert not (tmp_path / "other" / "postgres").exists()  # it started nothing


def test_down_stops_the_stack_it_names(up):
    out = aistack("down", "--data-dir", str(up.data_dir))
    assert out.returncode == 0, out.stderr
    assert up.proc.wait(60) == 0
    assert "stopped." in up.text()
    status = aistack("status", "--data-dir", str(up.data_dir))
    assert status.returncode == 3 and "not running" in status.stdout
    assert all(_free(DEFAULT_PORTS[s] + up.offset) for s in SERVICES)
