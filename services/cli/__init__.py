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
    port_offset: int = typer.Option(0, help="Add this to every default port (several stacks on one machine)."),
) -> None:
    """Start the whole stack as local processes; Ctrl-C (or `aistack down`) stops everything.

    One stack per data dir: a second `up` on the same dir exits at once naming the running one.
    """
    from .stack import DEFAULT_PORTS, Stack, StackError

    stack = Stack(data_dir.resolve(), database_url=os.environ.get("DATABASE_URL"),
                  redis_url=os.environ.get("REDIS_URL"), host=host, worker=worker,
                  ports={name: port + port_offset for name, port in DEFAULT_PORTS.items()})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    typer.echo("starting aistack ...")
    try:
        stack.start()
    except StackError as exc:  # another stack owns the data dir, a port is taken: one line
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (RuntimeError, TimeoutError) as exc:  # a server failed to start: its log's tail, no traceback
        typer.echo(f"error: aistack did not start: {exc}", err=True)
        raise typer.Exit(1) from None
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
        # A process that crashes is restarted by the stack (Stack.supervise, like compose's
        # restart policy); one that exits cleanly or is killed by a signal stops the stack.
        while not stop.is_set():
            for proc in stack.down_for_good():
                typer.echo(f"{proc.name} exited with {proc.popen.returncode}; stopping.\n{proc.tail()}", err=True)
                stop.set()
            stop.wait(1.0)
    finally:
        typer.echo("stopping ...")
        stack.stop()
        typer.echo("stopped.")


@app.command()
def status(
    data_dir: Path = typer.Option(Path("var"), help="The data dir of the stack."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Is a stack running on this data dir: its pid, URLs and each service's /ready."""
    import json

    import httpx

    from .stack import running_stack

    info = running_stack(data_dir.resolve())
    if info is None:
        typer.echo(json.dumps({"running": False}) if as_json else f"aistack is not running on {data_dir.resolve()}")
        raise typer.Exit(3)  # LSB: program is not running
    ready = {}
    with httpx.Client(timeout=2.0) as client:
        for name, url in (info.get("urls") or {}).items():
            try:
                ready[name] = "ready" if client.get(f"{url}/ready").status_code == 200 else "not ready"
            except httpx.HTTPError:
                ready[name] = "unreachable"
    if as_json:
        typer.echo(json.dumps({"running": True, **info, "ready": ready}))
        return
    typer.echo(f"aistack is running on {info.get('data_dir', data_dir.resolve())} (pid {info.get('pid')})")
    for name, url in (info.get("urls") or {}).items():
        typer.echo(f"{name:<13} {url:<26} {ready.get(name, '')}")
    typer.echo(f"logs in {info.get('logs')}")


@app.command()
def down(
    data_dir: Path = typer.Option(Path("var"), help="The data dir of the stack."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for it to stop."),
) -> None:
    """Stop the stack running on this data dir (the `aistack up` that owns it stops its own servers)."""
    import time

    from .stack import running_stack

    info = running_stack(data_dir.resolve())
    if info is None:
        typer.echo(f"aistack is not running on {data_dir.resolve()}")
        return
    pid = info.get("pid")
    if not isinstance(pid, int):
        typer.echo(f"{data_dir.resolve()} is locked by a process that did not say its pid", err=True)
        raise typer.Exit(1)
    os.kill(pid, signal.SIGTERM)
    typer.echo(f"stopping aistack (pid {pid}) ...")
    deadline = time.monotonic() + timeout
    while running_stack(data_dir.resolve()) is not None:
        if time.monotonic() > deadline:
            typer.echo(f"pid {pid} still runs after {timeout:.0f}s", err=True)
            raise typer.Exit(1)
        time.sleep(0.2)
    typer.echo("stopped.")


@app.command()
def logs(
    data_dir: Path = typer.Option(Path("var"), help="The data dir of the stack."),
    service: list[str] = typer.Option(None, "--service", "-s", help="Only this service (repeatable)."),
    trace_id: str = typer.Option(None, "--trace-id", "-t", help="Only lines of this trace."),
    follow_: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON lines as they are."),
) -> None:
    """The services' logs of a local stack merged in time order (one trace across services)."""
    import json

    from .logs import follow, merged

    logs_dir = data_dir.resolve() / "logs"
    if not logs_dir.is_dir():
        typer.echo(f"no logs in {logs_dir}", err=True)
        raise typer.Exit(1)
    lines = follow(logs_dir, service, trace_id) if follow_ else merged(logs_dir, service, trace_id)
    try:
        for line in lines:
            typer.echo(json.dumps(line.record) if as_json else line.render())
    except KeyboardInterrupt:
        pass


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
