"""`aistack users create --admin` and `aistack keys rotate` against a real database."""
from __future__ import annotations

import asyncio
import re

from typer.testing import CliRunner

from services.auth.service import AuthService
from services.auth.settings import AuthSettings
from services.chassis.clients import db_engine
from services.cli import _register_plugins, app
from tests.integration.test_auth_service import auth_db  # noqa: F401


async def _check(url: str, email: str, password: str):
    engine = db_engine(url, pool_size=1)
    try:
        auth = AuthService(engine, None, AuthSettings(database_url=url, key_cache_s=0))
        tokens = await auth.login(email, password)
        return tokens.scope.split(), (await auth.keys.jwks())["keys"]
    finally:
        await engine.dispose()


def test_users_create_admin_and_keys_rotate(auth_db, monkeypatch):  # noqa: F811
    monkeypatch.setenv("DATABASE_URL", auth_db)
    _register_plugins()
    runner = CliRunner()
    r = runner.invoke(app, ["users", "create", "cli-admin@example.test", "--admin"])
    assert r.exit_code == 0, r.output
    password = re.search(r"password: (\S+)", r.output).group(1)
    r = runner.invoke(app, ["keys", "rotate"])
    assert r.exit_code == 0, r.output
    kid = r.output.strip().rsplit(" ", 1)[1]
    scopes, jwks = asyncio.run(_check(auth_db, "cli-admin@example.test", password))
    assert "admin" in scopes and kid in {k["kid"] for k in jwks}
    r = runner.invoke(app, ["users", "create", "cli-admin@example.test"])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(app, ["users", "list"])
    assert "cli-admin@example.test" in r.output
