"""Bounded labels on every service's HTTP metrics (issue 19): route templates, never raw paths, and
no label value a client can make up (paths, ids, methods)."""
from __future__ import annotations

import secrets

import httpx

from services.chassis.app import create_service_app
from services.chassis.settings import ServiceSettings


def _series(text: str, service: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines()
            if not line.startswith("#") and f'service="{service}"' in line}


async def test_http_metrics_label_route_templates_and_known_methods_only():
    service = f"labels{secrets.token_hex(3)}"
    app = create_service_app(ServiceSettings(service_name=service), title="labels")

    @app.get("/v1/users/{user_id}")
    async def user(user_id: str) -> dict:
        return {"id": user_id}

    async def burst(c: httpx.AsyncClient, n: int) -> list[str]:
        made_up = []
        for _ in range(n):
            uid, junk, verb = secrets.token_hex(6), secrets.token_hex(6), f"X{secrets.token_hex(3).upper()}"
            made_up += [uid, junk, verb]
            assert (await c.get(f"/v1/users/{uid}")).status_code == 200
            assert (await c.get(f"/nowhere/{junk}")).status_code == 404
            await c.request(verb, f"/v1/users/{uid}")
        return made_up

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        await burst(c, 2)
        before = _series((await c.get("/metrics")).text, service)
        made_up = await burst(c, 25)
        text = (await c.get("/metrics")).text
    assert _series(text, service) == before
    assert 'route="/v1/users/{user_id}"' in text and 'route="unmatched"' in text and 'method="other"' in text
    assert not [v for v in made_up if v in text]
