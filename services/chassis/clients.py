"""Factories for outbound connections: pooled, with timeouts, instrumented by telemetry."""
from __future__ import annotations

import httpx
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def http_client(base_url: str = "", timeout: float = 10.0, max_connections: int = 200) -> httpx.AsyncClient:
    """Retries here cover connection failures only (safe for any method); callers retry the rest."""
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        transport=httpx.AsyncHTTPTransport(retries=2),
    )


def redis_client(url: str) -> aioredis.Redis:
    return aioredis.from_url(
        url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30,
        decode_responses=False,
    )


def asyncpg_url(url: str) -> str:
    """Accept plain postgresql:// URLs (what users and compose write) and use asyncpg."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix):]
    return url


def db_engine(url: str, pool_size: int = 10) -> AsyncEngine:
    from .telemetry import instrument_engine

    engine = create_async_engine(
        asyncpg_url(url), pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True,
        pool_timeout=5, connect_args={"timeout": 3},
    )
    instrument_engine(engine)
    return engine


def redis_ping(client: aioredis.Redis):
    async def check():
        await client.ping()
    return check


def db_ping(engine: AsyncEngine):
    from sqlalchemy import text

    async def check():
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    return check
