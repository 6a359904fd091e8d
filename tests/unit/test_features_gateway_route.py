"""Issue 16, observation 8: the feature registry, apply and materialise routes are reachable
through the gateway (admin scope), not sent to the orchestrator's catch-all."""
from __future__ import annotations

import pytest
from starlette.routing import Match

from services.gateway.api import router
from services.gateway.routes import ROUTES


def _first_match(method: str, path: str) -> str:
    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    for route in router.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route.name
    raise AssertionError(f"no route for {method} {path}")


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/admin/features/views"), ("POST", "/admin/features/views"), ("GET", "/admin/features/entities/e"),
    ("PUT", "/admin/features/views/v"), ("DELETE", "/admin/features/views/v"),
    ("GET", "/admin/features/views/v/versions"), ("POST", "/admin/features/apply"),
    ("POST", "/admin/features/materialize"), ("GET", "/admin/features/stats"),
    ("POST", "/admin/features/pii/rotate"),
])
def test_admin_features_routes_go_to_the_feature_store(method, path):
    assert _first_match(method, path).startswith("features_")


def test_admin_features_routes_need_the_admin_scope():
    routes = [r for r in ROUTES if r.path.startswith("/admin/features")]
    assert routes and all(r.upstream == "features" and r.scope == "admin" for r in routes)
    assert _first_match("GET", "/admin/models").startswith("orchestrator_")  # the catch-all still works
