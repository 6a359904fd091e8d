"""Run the whole stack as local processes: what `aistack up` and the e2e tests both use.

Starts embedded PostgreSQL and Redis when no URLs are given, migrates, builds the default
models, starts every service and a Celery worker, and waits until each /ready says 200.
"""
from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

DEFAULT_PORTS = {"gateway": 8000, "auth": 8001, "orchestrator": 8002, "model": 8003, "features": 8004,
                 "pipeline": 9100}
START_TIERS = (("model", "features", "auth"), ("orchestrator",), ("gateway", "pipeline", "worker"))
LOCK_FILE = "aistack.lock"  # in the data dir: flock held by the running `aistack up`, JSON about it


class StackError(RuntimeError):
    """A start-up refusal with a one-line reason for the user (no traceback)."""


class PortInUse(StackError):
    pass


def stack_lock(data_dir: Path):
    from services.chassis.embedded import DirLock

    return DirLock(data_dir / LOCK_FILE)


def running_stack(data_dir: Path) -> dict | None:
    """What the `aistack up` that owns data_dir wrote about itself (pid, urls), or None."""
    return stack_lock(data_dir).owner()


def describe_owner(data_dir: Path, info: dict) -> str:
    urls = info.get("urls") or {}
    where = f"; gateway {urls['gateway']}" if "gateway" in urls else ""
    return f"aistack is already running on {data_dir} (pid {info.get('pid', '?')}{where})"


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready_url: str | None
    log_path: Path
    popen: subprocess.Popen | None = None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Stack:
    data_dir: Path
    database_url: str | None = None
    redis_url: str | None = None
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    host: str = "127.0.0.1"
    extra_env: dict[str, str] = field(default_factory=dict)
    worker: bool = True
    procs: list[Proc] = field(default_factory=list)
    _embedded: list = field(default_factory=list)
    _lock: object = None
    # The first admin (AUTH_BOOTSTRAP_ADMIN_*); when none is given, a development admin with a
    # random password, printed once by start(). Auth uses it only while no admin exists.
    admin_email: str | None = None
    admin_password: str | None = None
    # Restart on failure (supervise()): name -> (restarts so far, monotonic time of the next start).
    _restarts: dict = field(default_factory=dict)
    _supervisor: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    def url(self, service: str) -> str:
        return f"http://{self.host}:{self.ports[service]}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, ready_timeout: float = 180.0) -> None:
        """Take the data dir, start everything, wait until ready.

        Raises StackError, having touched nothing, when another `aistack up` owns the data dir
        (DataDirBusy) or a service port is taken (PortInUse).
        """
        from services.chassis.embedded import DataDirBusy

        self._lock = stack_lock(self.data_dir)
        try:
            self._lock.acquire(self.describe())
        except DataDirBusy as exc:
            raise StackError(describe_owner(self.data_dir, exc.info)) from None
        try:
            self._check_ports()
        except BaseException:
            self._lock.release()
            raise
        generated = self._admin_credentials()
        try:
            self._start_datastores()
            from services.chassis.migrate import upgrade_all
            from services.model.build import build

            upgrade_all(self.database_url)
            build(self.models_dir)
            deadline = time.monotonic() + ready_timeout
            plan = {proc.name: proc for proc in self._plan()}
            # In dependency order, each tier ready before the next starts (as compose's
            # depends_on: service_healthy): a caller never meets a callee still starting, so a
            # clean start logs no connection errors or replica ejections.
            for tier in START_TIERS:
                for name in tier:
                    if name in plan:
                        self._spawn(plan[name])
                self._wait_ready(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        self._lock.write(self.describe())
        self._supervise_in_background()
        if generated:
            print(f"development admin: {self.admin_email}  password: {self.admin_password}\n"
                  "(shown once; valid only if the database had no admin yet)", flush=True)

    def describe(self) -> dict:
        """What `aistack status` and a refused second run say about this stack."""
        return {"pid": os.getpid(), "data_dir": str(self.data_dir), "started": time.time(),
                "urls": {name: self.url(name) for name in self.ports},
                "logs": str(self.data_dir / "logs"), "admin_email": self.admin_email}

    def _local_secrets(self) -> dict[str, str]:
        """Keys for a stack whose database is embedded in data_dir: made once, kept beside it
        (secrets.json, 0600), so data encrypted at rest stays readable across restarts and no
        service falls back to (and warns about) a fixed development key. With an outside
        DATABASE_URL the operator provides them (the environment always wins)."""
        if any(server.__class__.__name__ == "EmbeddedPostgres" for server in self._embedded):
            import base64
            import json
            import secrets

            path = self.data_dir / "secrets.json"
            try:
                return json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                pass
            fernet = lambda: base64.urlsafe_b64encode(os.urandom(32)).decode()
            values = {"AUTH_KEY_ENCRYPTION_KEY": fernet(), "FEATURES_PII_KEYS": fernet(),
                      "AUTH_AUDIT_SALT": secrets.token_urlsafe(24)}
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(values, fh)
            return values
        return {}

    def _check_ports(self) -> None:
        for name, port in self.ports.items():
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((self.host, port))
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                    raise PortInUse(f"port {port} ({name}) on {self.host} is already in use; stop what "
                                    f"listens there or run `aistack status` to see a running stack") from None

    def _admin_credentials(self) -> bool:
        """Admin from AUTH_BOOTSTRAP_ADMIN_EMAIL/PASSWORD, else a generated one; True if generated."""
        env = {**os.environ, **self.extra_env}
        email, password = env.get("AUTH_BOOTSTRAP_ADMIN_EMAIL"), env.get("AUTH_BOOTSTRAP_ADMIN_PASSWORD")
        if email and password:
            self.admin_email, self.admin_password = email, password
            return False
        if self.admin_email and self.admin_password:
            return False
        import secrets

        self.admin_email, self.admin_password = "admin@aistack.local", secrets.token_urlsafe(18)
        return True

    def _start_datastores(self) -> None:
        if self.database_url and self.redis_url:
            return
        from services.chassis import embedded

        if not self.database_url:
            pg = embedded.EmbeddedPostgres(self.data_dir / "postgres")
            self._embedded.append(pg)
            self.database_url = ensure_database(pg.start(), "aistack")
        if not self.redis_url:
            rd = embedded.EmbeddedRedis(self.data_dir / "redis")
            self._embedded.append(rd)
            self.redis_url = rd.start()

    def _plan(self) -> list[Proc]:
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        base = {**os.environ, "DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url,
                "PYTHONUNBUFFERED": "1", **self.extra_env}
        for name, value in self._local_secrets().items():
            base.setdefault(name, value)
        # One shared secret for the services' /internal/* endpoints (docs/privacy.md).
        if not base.get("INTERNAL_TOKEN"):
            import secrets

            base["INTERNAL_TOKEN"] = secrets.token_urlsafe(32)
        wiring = {
            "gateway": {"GATEWAY_ORCHESTRATOR_URLS": self.url("orchestrator"), "GATEWAY_AUTH_URL": self.url("auth"),
                        "GATEWAY_FEATURES_URL": self.url("features"), "GATEWAY_MODEL_URLS": self.url("model"),
                        "GATEWAY_PIPELINE_URLS": self.url("pipeline")},
            "auth": {"AUTH_BOOTSTRAP_ADMIN_EMAIL": self.admin_email or "",
                     "AUTH_BOOTSTRAP_ADMIN_PASSWORD": self.admin_password or "",
                     "AUTH_ORCHESTRATOR_URL": self.url("orchestrator"), "AUTH_PIPELINE_URL": self.url("pipeline"),
                     "AUTH_FEATURES_URL": self.url("features"),
                     # The gateway runs on this host: auth believes its X-Forwarded-For, no one else's.
                     "AUTH_TRUSTED_PROXIES": "127.0.0.1/32,::1/128"},
            "orchestrator": {"ORCHESTRATOR_MODEL_URLS": self.url("model"),
                             "ORCHESTRATOR_FEATURES_URL": self.url("features")},
            "model": {"MODEL_REPOSITORY": str(self.models_dir)},
            "features": {},
            "pipeline": {"PIPELINE_MODEL_URL": self.url("model"), "PIPELINE_FEATURES_URL": self.url("features"),
                         "PIPELINE_MODEL_REPOSITORY": str(self.models_dir), "PIPELINE_DATA_DIR": str(self.data_dir / "pipeline")},
        }
        procs = []
        # Start the leaves first so that the services that call them become ready sooner.
        for name in ("model", "features", "auth", "orchestrator", "gateway", "pipeline"):
            prefix = name.upper() + "_"
            env = {**base, **wiring[name], f"{prefix}HOST": self.host, f"{prefix}PORT": str(self.ports[name]),
                   "OTEL_SERVICE_NAME": name}
            procs.append(Proc(name, [sys.executable, "-m", f"services.{name}"], env,
                              f"{self.url(name)}/ready", logs / f"{name}.log"))
        if self.worker:
            # The worker accepts JSON only (never pickle), the risk Celery's superuser warning is
            # about; on a root dev shell it would be the one warning of a clean start.
            env = {**procs[-1].env, "OTEL_SERVICE_NAME": "pipeline-worker",
                   "PIPELINE_WORKER_METRICS_PORT": str(self.ports.get("worker", self.ports["pipeline"] + 1)),
                   "PYTHONWARNINGS": "ignore:You're running the worker with superuser privileges"}
            procs.append(Proc("worker", [sys.executable, "-m", "services.pipeline", "worker", "--beat"], env, None,
                              logs / "worker.log"))
        return procs

    def launch(self, procs: list[Proc], ready_timeout: float = 180.0) -> None:
        """Start these processes in order and wait until each one with a ready_url answers 200;
        stop() stops them with the rest (the compose wiring test starts its own plan this way)."""
        for proc in procs:
            self._spawn(proc)
        self._wait_ready(ready_timeout)
        self._supervise_in_background()

    def _spawn(self, proc: Proc) -> None:
        self._popen(proc)
        self.procs.append(proc)

    @staticmethod
    def _popen(proc: Proc) -> None:
        log = proc.log_path.open("ab")
        # Own session: a Ctrl-C in the terminal reaches us, and we stop children in order.
        proc.popen = subprocess.Popen(proc.argv, env=proc.env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        log.close()

    # -- supervision ------------------------------------------------------------------------
    RESTART_BACKOFF_MAX_S = 30.0

    def supervise(self, now: float | None = None) -> list[str]:
        """compose's `restart: on-failure` for local processes: one that exited by itself with an
        error (a crash, a library's "unrecoverable error") starts again after 1, 2, 4 ... 30 s. One
        that exited cleanly or was killed by a signal (someone meant it) stays down. Returns a line
        per restart."""
        now = time.monotonic() if now is None else now
        lines = []
        for proc in list(self.procs):
            code = proc.popen.poll() if proc.popen is not None else None
            if code is None or code <= 0 or self._stopping.is_set():
                continue
            count, due = self._restarts.get(proc.name, (0, None))
            if due is None:
                self._restarts[proc.name] = (count, now + min(2.0 ** count, self.RESTART_BACKOFF_MAX_S))
                continue
            if now < due:
                continue
            line = f"aistack: {proc.name} exited with {code}; restarting it (restart {count + 1})"
            with proc.log_path.open("a") as log:
                log.write(line + "\n")
            self._popen(proc)
            self._restarts[proc.name] = (count + 1, None)
            lines.append(line)
        return lines

    def down_for_good(self) -> list[Proc]:
        """Processes that exited and that supervise() will not restart."""
        return [p for p in self.procs if p.popen is not None and (code := p.popen.poll()) is not None and code <= 0]

    def _supervise_in_background(self) -> None:
        if self._supervisor is not None:
            return
        self._stopping.clear()

        def run():
            while not self._stopping.wait(0.5):
                for line in self.supervise():
                    print(line, file=sys.stderr, flush=True)

        self._supervisor = threading.Thread(target=run, daemon=True, name="aistack-supervisor")
        self._supervisor.start()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = [p for p in self.procs if p.ready_url]
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for proc in list(pending):
                    if proc.popen.poll() is not None:
                        raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
                    try:
                        if client.get(proc.ready_url).status_code == 200:
                            pending.remove(proc)
                    except httpx.HTTPError:
                        pass
                if pending and time.monotonic() > deadline:
                    names = ", ".join(p.name for p in pending)
                    raise TimeoutError(f"not ready after {timeout:.0f}s: {names}\n{pending[0].tail()}")
                if pending:
                    time.sleep(0.2)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every process group, wait, then SIGKILL what is left; then the datastores."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(5)
            self._supervisor = None
        for proc in reversed(self.procs):
            _signal_group(proc.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.popen, signal.SIGKILL)
            proc.popen.wait()
        self.procs.clear()
        for server in reversed(self._embedded):
            server.stop()
        self._embedded.clear()
        if self._lock is not None:
            self._lock.release()


def _signal_group(popen: subprocess.Popen | None, sig: int) -> None:
    if popen is None:
        return
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def ensure_database(server_url: str, name: str) -> str:
    """Create database `name` on the server if missing and return its URL."""
    import asyncpg

    async def run():
        conn = await asyncpg.connect(server_url)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(run())
    return server_url.rsplit("/", 1)[0] + f"/{name}"
