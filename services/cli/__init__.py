"""The `aistack` command: run the stack, build models, migrate, and admin tasks."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import typer

app = typer.Typer(help="aistack: an open production stack for serving AI models.", no_args_is_help=True)
models_app = typer.Typer(help="Model repository tasks.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@app.command()
def up(
    data_dir: Path = typer.Option(Path("var"), help="Where embedded databases, models and logs live."),
    host: str = typer.Option("127.0.0.1", help="Interface the services listen on."),
    worker: bool = typer.Option(True, help="Start a Celery worker too."),
) -> None:
    """Start the whole stack as local processes; Ctrl-C stops everything."""
    from .stack import Stack

    stack = Stack(data_dir.resolve(), database_url=os.environ.get("DATABASE_URL"),
                  redis_url=os.environ.get("REDIS_URL"), host=host, worker=worker)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    typer.echo("starting aistack ...")
    stack.start()
    typer.echo(f"postgres: {_redact(stack.database_url)}\nredis:    {stack.redis_url}")
    for name in ("gateway", "auth", "orchestrator", "model", "features", "pipeline"):
        typer.echo(f"{name:<13} {stack.url(name)}")
    gw = stack.url("gateway")
    typer.echo(f"logs in {stack.data_dir / 'logs'}; try:\n"
               f"  TOKEN=$(curl -s {gw}/v1/auth/token -d username={stack.admin_email} "
               f"-d password=... | jq -r .access_token)\n"
               f"  curl -s {gw}/v1/predict/fraud -H \"authorization: Bearer $TOKEN\" "
               "-H 'content-type: application/json' -d '{\"inputs\": {\"customer_id\": \"C0042\", \"amount\": 250}}'\n"
               f"dashboard: {gw}/admin/\nCtrl-C to stop.")
    try:
        while not stop.is_set():
            for proc in stack.procs:
                if proc.popen.poll() is not None:
                    typer.echo(f"{proc.name} exited with {proc.popen.returncode}; stopping.\n{proc.tail()}", err=True)
                    stop.set()
            stop.wait(1.0)
    finally:
        typer.echo("stopping ...")
        stack.stop()
        typer.echo("stopped.")


def _redact(url: str | None) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True) if url else ""


@app.command()
def migrate(database_url: str = typer.Option(..., envvar="DATABASE_URL")) -> None:
    """Apply every service's migrations to its own schema."""
    from services.chassis.migrate import SCHEMA_OWNERS, upgrade_all

    upgrade_all(database_url)
    typer.echo(f"migrated schemas: {', '.join(SCHEMA_OWNERS)}")


@models_app.command("build")
def models_build(
    repository: Path = typer.Option(Path("var/models"), envvar="MODEL_REPOSITORY"),
    force: bool = typer.Option(False, help="Rebuild versions that already exist."),
) -> None:
    """Train the default models reproducibly into the versioned model repository."""
    from rich.console import Console
    from rich.progress import Progress

    from services.model.build import BUILDERS, build

    built, names = [], list(dict.fromkeys(name for name, _ in BUILDERS))
    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task("building models", total=len(names))
        for name in names:
            bar.update(task, description=f"building {name}")
            built += build(repository, force=force, only=[name])
            bar.advance(task)
    typer.echo("built: " + (", ".join(built) if built else "nothing (all present; --force rebuilds)"))


# Each service may add its own command group in services/<name>/cli.py (a typer.Typer named `app`).
PLUGINS = ("auth", "features", "pipeline")


def _register_plugins() -> None:
    import importlib

    for name in PLUGINS:
        try:
            module = importlib.import_module(f"services.{name}.cli")
        except ModuleNotFoundError as exc:
            if exc.name != f"services.{name}.cli":
                raise
            continue
        app.add_typer(module.app, name=getattr(module, "NAME", name))
        for group, sub_app in getattr(module, "GROUPS", {}).items():  # more groups from one module
            app.add_typer(sub_app, name=group)
    from .admin import register as register_admin  # `aistack login` and `aistack admin ...` (HTTP)

    register_admin(app)


def main() -> None:
    _register_plugins()
    app()
