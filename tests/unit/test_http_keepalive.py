"""Pooled connections to our services expire on the client side first (issue 18 gateway bench: a
POST through the gateway answered 502 when it took a connection the orchestrator was closing)."""
from __future__ import annotations

import uvicorn

from services.chassis.clients import http_client


async def test_the_client_drops_idle_connections_before_uvicorn_closes_them():
    client = http_client()
    try:
        expiry = client._transport._pool._keepalive_expiry  # httpcore's pool, as configured
    finally:
        await client.aclose()
    assert expiry is not None and expiry < uvicorn.Config(app=None).timeout_keep_alive


async def test_the_pool_limits_reach_the_transport():
    client = http_client(max_connections=123)
    try:
        pool = client._transport._pool
        assert pool._max_connections == 123 and pool._max_keepalive_connections == 123
    finally:
        await client.aclose()
