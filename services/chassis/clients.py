"""Factories for outbound connections: pooled, with timeouts, instrumented by telemetry."""
from __future__ import annotations

import functools
import logging
import os
import ssl

import httpx
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = logging.getLogger("aistack.http")
KEEPALIVE_EXPIRY_S = 4.0  # below uvicorn's default timeout_keep_alive (5 s), which every service uses


def http_client(base_url: str = "", timeout: float = 10.0, max_connections: int = 200) -> httpx.AsyncClient:
    """Retries here cover requests the peer never processed, safe for any method: connection
    failures, and a pooled keep-alive connection that the peer closed before any response byte
    arrived (retried once on a fresh connection, see StaleConnectionRetry). Callers retry the rest.

    https:// upstreams are verified against the public roots plus AISTACK_CA_BUNDLE (a PEM file of
    extra CAs, e.g. the stack's own development CA); SSL_CERT_FILE / SSL_CERT_DIR replace the
    public roots altogether, as in every OpenSSL client.
    """
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them from the
    # other side: at equal timeouts a request can take a connection the peer is closing (a 502).
    # The limits go to the transport: httpx ignores the client's `limits` when given a transport.
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                          keepalive_expiry=KEEPALIVE_EXPIRY_S)
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
        transport=StaleConnectionRetry(retries=2, verify=tls_client_context(), limits=limits),
    )


_NO_RESPONSE = "without sending a response"  # httpcore's message when the peer closed before answering


def peer_closed_before_response(exc: Exception) -> bool:
    """True when the peer closed the connection before sending any response byte: nothing was
    processed (a keep-alive connection it had just closed, e.g. after an error, an idle timeout or
    at the start of its graceful shutdown). A write that failed means the request never fully
    arrived, so the peer cannot have acted on it either."""
    return (isinstance(exc, httpx.RemoteProtocolError) and _NO_RESPONSE in str(exc)) or isinstance(
        exc, httpx.WriteError)


class StaleConnectionRetry(httpx.AsyncHTTPTransport):
    """A pooled connection can be closed by the peer while the request is on its way; the request
    then fails though the peer never saw it. Send it once more, on a fresh connection, whatever the
    method (a streamed body that cannot be replayed is the exception)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except (httpx.RemoteProtocolError, httpx.WriteError) as exc:
            if not peer_closed_before_response(exc) or not isinstance(request.stream, httpx.ByteStream):
                raise
            log.info("%s %s: connection closed by the peer before a response; sending once more",
                     request.method, request.url.host)
            return await super().handle_async_request(request)


def tls_client_context() -> ssl.SSLContext:
    """The trust store for outbound HTTPS (see http_client); built once per CA setting."""
    return _tls_client_context(os.environ.get("AISTACK_CA_BUNDLE", "").strip(),
                               os.environ.get("SSL_CERT_FILE", ""), os.environ.get("SSL_CERT_DIR", ""))


@functools.lru_cache(maxsize=4)
def _tls_client_context(bundle: str, cert_file: str, cert_dir: str) -> ssl.SSLContext:
    if cert_file or cert_dir:
        ctx = ssl.create_default_context(cafile=cert_file or None, capath=cert_dir or None)
    else:
        import certifi

        ctx = ssl.create_default_context(cafile=certifi.where())
    if bundle:
        if not os.path.isfile(bundle):
            raise RuntimeError(f"AISTACK_CA_BUNDLE {bundle!r} is not a readable file")
        ctx.load_verify_locations(cafile=bundle)
    return ctx


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
