"""Shared fixtures: real PostgreSQL and Redis, isolated per test run, cleaned up afterwards.

TEST_DATABASE_URL / TEST_REDIS_URL point at existing servers (CI on this machine sets them);
without them, embedded servers start once per test session.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import socket
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedded")


@pytest.fixture(scope="session")
def postgres_server_url(embedded_dir):
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    from services.chassis.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(embedded_dir / "postgres")
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def redis_server_url(embedded_dir):
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        yield url
        return
    from services.chassis.embedded import EmbeddedRedis

    server = EmbeddedRedis(embedded_dir / "redis")
    yield server.start()
    server.stop()


async def _admin(server_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def poll(fn, what: str, timeout: float = 90.0, every: float = 0.5):
    """Wait until fn() is truthy (and return it): conditions, never durations, decide a test."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(every)


@contextmanager
def schema_database(server_url: str, service: str):
    """A database of its own with one service's schema only (a known empty state), dropped after."""
    from services.chassis.migrate import upgrade

    name = f"aistack_{service}_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    url = _with_db(server_url, name)
    try:
        upgrade(service, url)
        yield url
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _with_db(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


@contextmanager
def migrated_database(server_url: str, label: str = "test"):
    """A fresh database with every schema migrated to head, dropped after."""
    from services.chassis.migrate import upgrade_all

    name = f"aistack_{label}_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    url = _with_db(server_url, name)
    try:
        upgrade_all(url)
        yield url
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def database_url(postgres_server_url):
    """A fresh database for this test run, migrated to head, dropped at the end."""
    with migrated_database(postgres_server_url) as url:
        yield url


@contextmanager
def claimed_redis_db(server_url: str):
    """An empty Redis db number of one's own, claimed atomically so that two runs (or two stacks
    of one run) never share a keyspace or a Celery queue; flushed when done."""
    import redis

    base = server_url.rsplit("/", 1)[0] if server_url.count("/") > 2 else server_url
    candidates = list(range(1, 16))
    secrets.SystemRandom().shuffle(candidates)
    for db in candidates:
        client = redis.Redis.from_url(f"{base}/{db}")
        if client.dbsize() == 0 and client.set("aistack:test-claim", os.getpid(), nx=True):
            break
        client.close()
    else:
        pytest.fail("no empty Redis database (1-15) to isolate this test run")
    try:
        yield f"{base}/{db}"
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def redis_url(redis_server_url):
    """An empty Redis db of our own for this run."""
    with claimed_redis_db(redis_server_url) as url:
        yield url


@pytest.fixture(scope="module")
def private_redis_url(redis_server_url):
    """A Redis db for one module whose tests read whole streams or keyspaces, or run a worker."""
    with claimed_redis_db(redis_server_url) as url:
        yield url


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    from services.model.build import build

    root = tmp_path_factory.mktemp("models")
    build(root)
    return root


# Every stack of a run shares the run's database, so they share its first admin too.
TEST_ADMIN = {"AUTH_BOOTSTRAP_ADMIN_EMAIL": "admin@aistack.test",
              "AUTH_BOOTSTRAP_ADMIN_PASSWORD": secrets.token_urlsafe(18)}
STACK_ENV = {**TEST_ADMIN}


@pytest.fixture(scope="session")
def stack(tmp_path_factory, database_url, redis_url, models_dir):
    """The whole stack as separate processes on free ports (what `aistack up` runs)."""
    from services.cli.stack import DEFAULT_PORTS, Stack

    data_dir = tmp_path_factory.mktemp("stack")
    (data_dir / "models").symlink_to(models_dir)
    s = Stack(data_dir, database_url=database_url, redis_url=redis_url,
              ports={name: free_port() for name in DEFAULT_PORTS}, extra_env=STACK_ENV)
    s.start()
    yield s
    s.stop()


class ServedApp:
    """A FastAPI app served by a real uvicorn server on a free port, in a background thread."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServedApp:
        import time

        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("app did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
