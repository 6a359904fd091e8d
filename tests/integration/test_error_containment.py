"""Issue 16, observation 7: an unhandled exception must not cost the caller its keep-alive
connection, and a request sent on a connection the peer closed before answering is sent once
more (any method), so a 500 upstream never turns into 502s for the requests after it."""
from __future__ import annotations

import asyncio
import socket

import httpx
import orjson
import pytest
from fastapi import FastAPI

from services.chassis.clients import http_client
from services.chassis.errors import ContainErrors, install_error_handlers
from services.chassis.upstream import Proxy, UpstreamPool
from tests.conftest import ServedApp


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug")

    @app.post("/ok")
    async def ok() -> dict:
        return {"ok": True}

    @app.middleware("http")
    async def broken_middleware(request, call_next):
        if request.url.path == "/middleware-boom":
            raise KeyError("a bug outside the routes")
        return await call_next(request)

    return app


def _read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed; got {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed mid-body")
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _request(path: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n".encode()


def test_unhandled_error_is_a_500_in_the_shape_and_the_connection_stays_usable():
    with ServedApp(_app()) as served, socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        for path in ("/boom", "/middleware-boom"):
            sock.sendall(_request(path))
            status, headers, body = _read_response(sock)
            assert status == 500 and headers.get("connection") != "close"
            assert orjson.loads(body) == {"error": {"code": "internal", "message": "internal server error",
                                                    "details": None}}
            # The same connection answers the next request.
            sock.sendall(_request("/ok"))
            status, _, body = _read_response(sock)
            assert (status, orjson.loads(body)) == (200, {"ok": True})


async def _closing_server(answer_after: int):
    """A server that reads each request and closes the connection without a byte of response,
    `answer_after` times, then answers 200; records what it received."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            body = await reader.readexactly(length) if length else b""
            seen.append(head.split(b"\r\n")[0] + b" " + body)
            if len(seen) <= answer_after:
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
                         b'{"ok":true}')
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


async def test_client_resends_once_a_post_the_peer_closed_before_answering():
    server, seen = await _closing_server(answer_after=1)
    port = server.sockets[0].getsockname()[1]
    async with server, http_client(f"http://127.0.0.1:{port}") as http:
        r = await http.post("/historical", json={"rows": [1]})
        assert r.status_code == 200 and r.json() == {"ok": True}
    assert seen == [b'POST /historical HTTP/1.1 {"rows":[1]}'] * 2


async def test_client_gives_up_after_one_resend():
    server, seen = await _closing_server(answer_after=10)
    port = server.sockets[0].getsockname()[1]
    async with server, http_client(f"http://127.0.0.1:{port}") as http:
        try:
            await http.post("/historical", json={})
            raise AssertionError("expected the second close to surface")
        except httpx.RemoteProtocolError:
            pass
    assert len(seen) == 2


async def test_gateway_proxy_after_an_upstream_500_never_answers_502():
    """The observed path: a 500 from a single features replica, then POSTs through the proxy."""
    with ServedApp(_app()) as served:
        async with http_client() as http:
            proxy = Proxy(http, UpstreamPool("features", [served.url]))
            statuses = []
            for _ in range(5):
                statuses.append((await proxy.forward("POST", "/boom", b"", {})).status_code)
                for _ in range(2):
                    statuses.append((await proxy.forward("POST", "/ok", b"", {})).status_code)
    assert statuses == [500, 200, 200] * 5


@pytest.mark.parametrize("service", ["gateway", "auth", "orchestrator", "model", "features", "pipeline"])
def test_every_service_app_has_the_containment_outermost(service):
    """Item 7 is platform-wide: every service builds its app through the chassis."""
    import importlib

    module = importlib.import_module(f"services.{service}.app")
    app = module.create_app()
    assert isinstance(app.build_middleware_stack(), ContainErrors)
