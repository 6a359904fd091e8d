"""`aistack users ...` and `aistack keys ...`: admin tasks straight against the auth database."""
from __future__ import annotations

import asyncio
import secrets

import typer

NAME = "users"
app = typer.Typer(help="Users of the auth service (talks to DATABASE_URL directly).", no_args_is_help=True)
keys_app = typer.Typer(help="Signing keys of the auth service.", no_args_is_help=True)
# services/cli registers these next to `app` (NAME).
GROUPS = {"keys": keys_app}


def _run(work):
    """Build an AuthService on DATABASE_URL (no Redis needed), run `work(service)`, dispose."""
    from services.chassis.clients import db_engine

    from .service import AuthService
    from .settings import AuthSettings

    async def main():
        settings = AuthSettings()
        engine = db_engine(settings.require("database_url"), pool_size=2)
        try:
            return await work(AuthService(engine, None, settings))
        finally:
            await engine.dispose()

    return asyncio.run(main())


@app.command("create")
def create(
    email: str,
    admin: bool = typer.Option(False, "--admin", help="Give the user the admin role."),
    role: str = typer.Option("viewer", help="admin, developer, service or viewer."),
    password: str | None = typer.Option(None, envvar="AISTACK_USER_PASSWORD",
                                           help="Default: a random password, printed once."),
) -> None:
    """Create a user; without --password a random one is generated and printed once."""
    from services.chassis.errors import AppError

    role = "admin" if admin else role
    generated = password is None
    password = password or secrets.token_urlsafe(18)
    try:
        user = _run(lambda auth: auth.create_user(email, password, role))
    except AppError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1)
    typer.echo(f"created {user.email} (role {user.role}, id {user.id})")
    if generated:
        typer.echo(f"password: {password}\n(shown once; store it now)")


@app.command("list")
def list_users() -> None:
    """List users."""
    for u in _run(lambda auth: auth.list_users(limit=1000)):
        typer.echo(f"{u.id}  {u.email:<40} {u.role:<10} {'disabled' if u.disabled else ''}")


@app.command("disable")
def disable(user_id: str) -> None:
    """Disable a user and end their sessions."""
    user = _run(lambda auth: auth.update_user(user_id, disabled=True))
    typer.echo(f"disabled {user.email}")


@keys_app.command("rotate")
def rotate() -> None:
    """Start signing with a new key; the previous public key stays published until its tokens expire."""
    async def work(auth):
        await auth.keys.ensure()
        return await auth.keys.rotate()

    typer.echo(f"new signing key: {_run(work)}")
