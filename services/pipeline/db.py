"""Database access for the pipeline's own schema, from the app and from tasks (both pooled)."""
from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy import Executable
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.chassis.clients import asyncpg_url

T = TypeVar("T")


def task_engine(url: str) -> AsyncEngine:
    """The engine tasks share within one process: a small pool, each connection checked before
    use (a restarted Postgres leaves dead ones behind). Timeouts on connect and on every statement:
    a paused Postgres is an error to retry, not a hang."""
    return create_async_engine(asyncpg_url(url), pool_size=2, max_overflow=4, pool_pre_ping=True,
                               pool_recycle=300, connect_args={"timeout": 5, "command_timeout": 30})


class _Loop:
    """One event loop thread per process, where every task's database work runs on pooled
    connections. A task used to build an engine, an event loop and a connection for each call
    (9 ms; five calls per chunk). Recreated after a fork: a pool child never shares its parent's
    loop or sockets."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pid: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engines: dict[str, AsyncEngine] = {}

    def get(self) -> asyncio.AbstractEventLoop:
        with self.lock:
            if self.pid != os.getpid():
                self.loop = asyncio.new_event_loop()
                threading.Thread(target=self.loop.run_forever, daemon=True, name="pipeline-db").start()
                self.pid, self.engines = os.getpid(), {}
            return self.loop

    def engine(self, url: str) -> AsyncEngine:  # on the loop's thread only
        if url not in self.engines:
            self.engines[url] = task_engine(url)
        return self.engines[url]


_LOOP = _Loop()


def run_with_engine(url: str, fn: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run `fn(engine)` to completion from synchronous (Celery task) code, on this process's
    database loop; safe from any thread (a chunk's heartbeat runs beside the task)."""
    async def main():
        return await fn(_LOOP.engine(url))

    return asyncio.run_coroutine_threadsafe(main(), _LOOP.get()).result()


async def fetch_all(engine: AsyncEngine, stmt: Executable) -> list[dict]:
    """Rows of a SQLAlchemy Core statement (over tables.py: the pipeline's one persistence style)."""
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(stmt)]
