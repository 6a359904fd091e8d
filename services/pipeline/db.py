"""Database access for the pipeline's own schema, from the app (pooled) and from tasks (one-shot)."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy import Executable, pool
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.chassis.clients import asyncpg_url

T = TypeVar("T")


def task_engine(url: str) -> AsyncEngine:
    """An engine for one task run: no pool to survive the event loop that asyncio.run closes.
    Timeouts on connect and on every statement: a paused Postgres is an error to retry, not a hang."""
    return create_async_engine(asyncpg_url(url), poolclass=pool.NullPool,
                               connect_args={"timeout": 5, "command_timeout": 30})


def run_with_engine(url: str, fn: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run `fn(engine)` to completion from synchronous (Celery task) code."""
    async def main():
        engine = task_engine(url)
        try:
            return await fn(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


async def fetch_all(engine: AsyncEngine, stmt: Executable) -> list[dict]:
    """Rows of a SQLAlchemy Core statement (over tables.py: the pipeline's one persistence style)."""
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(stmt)]
