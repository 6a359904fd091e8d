"""`aistack features ...`: registry and offline-store tasks, run against the database directly
(DATABASE_URL), the same code paths the service's admin API uses."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Feature store: apply registry files, ingest offline data.", no_args_is_help=True)
_DB = typer.Option(..., envvar="DATABASE_URL", help="Postgres URL (the features schema must be migrated).")


def _fail(exc) -> None:
    typer.echo(f"error: {exc.message}", err=True)
    if exc.details:
        typer.echo(json.dumps(exc.details, indent=2, default=str)[:4000], err=True)
    raise typer.Exit(1)


def format_change(change) -> str:
    sign = {"created": "+", "updated": "~", "unchanged": "=", "deleted": "-"}[change.action]
    line = f"{sign} {change.kind} {change.name}: {change.action} (v{change.version})"
    for field, diff in change.diff.items():
        if field == "features":
            parts = [f"{k} {', '.join(v)}" for k, v in diff.items() if v]
            line += f"\n    features: {'; '.join(parts)}"
        else:
            line += f"\n    {field}: {diff[0]!r} -> {diff[1]!r}"
    return line


async def _with_store(database_url: str, fn):
    from services.chassis.clients import db_engine

    from .service import FeatureStore

    engine = db_engine(database_url, pool_size=2)
    try:
        return await fn(FeatureStore(engine, None))
    finally:
        await engine.dispose()


@app.command()
def apply(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                         help="YAML registry file (entities, feature_views).")],
    database_url: str = _DB,
    dry_run: bool = typer.Option(False, help="Show what would change; change nothing."),
) -> None:
    """Create or update the entities and feature views in FILE (idempotent); print what changes."""
    from pydantic import ValidationError

    from services.chassis.errors import AppError

    from .registry import load_doc

    try:
        doc = load_doc(file)
    except ValidationError as exc:
        typer.echo(f"error: {file} is not a valid registry file:\n{exc}", err=True)
        raise typer.Exit(1)
    try:
        changes = asyncio.run(_with_store(database_url, lambda s: s.apply(doc, dry_run=dry_run)))
    except AppError as exc:
        _fail(exc)
    for change in changes:
        typer.echo(format_change(change))
    counts = {a: sum(c.action == a for c in changes) for a in ("created", "updated", "unchanged")}
    typer.echo(("dry run: " if dry_run else "") + ", ".join(f"{n} {a}" for a, n in counts.items()))


def read_frame(file: Path):
    import pandas as pd

    suffix = file.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(file)
    if suffix in (".csv", ".txt"):
        return pd.read_csv(file)
    raise typer.BadParameter(f"{file}: expected .csv or .parquet")


@app.command()
def ingest(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV or Parquet file.")],
    view: str = typer.Option(..., "--view", help="Feature view the rows belong to."),
    database_url: str = _DB,
    event_time_column: str = typer.Option("event_time", help="Column with each row's event time."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Append FILE's rows to the offline store (all or nothing); columns: join key, event time,
    every feature of the view. Materialisation then brings the newest values online."""
    from services.chassis.errors import AppError

    df = read_frame(file)
    if event_time_column not in df.columns:
        raise typer.BadParameter(f"no column '{event_time_column}' in {file}")
    df = df.rename(columns={event_time_column: "event_time"})
    import pandas as pd

    df["event_time"] = pd.to_datetime(df["event_time"], utc=True)

    async def run(store):
        reg = await store.registry(fresh=True)
        entity = reg.entity(reg.view(view).entity)
        if entity.dtype == "string" and entity.join_key in df.columns:
            df[entity.join_key] = df[entity.join_key].astype(str)
        records = df.astype(object).where(df.notna(), None).to_dict("records")
        with _progress(as_json) as bar:
            task = bar.add_task(f"ingest {file.name}", total=len(records))
            return await store.ingest(view, records, source=f"ingest:{file.name}",
                                      progress=lambda done: bar.update(task, completed=done))

    try:
        n = asyncio.run(_with_store(database_url, run))
    except AppError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps({"view": view, "rows": n}))
    else:
        typer.echo(f"ingested {n} rows into '{view}' (offline store); materialise to serve them online")


def _progress(quiet: bool):
    """A rich progress bar on stderr (nothing when --json asks for clean output)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=quiet, transient=False)


@app.command()
def materialize(
    views: Annotated[list[str] | None, typer.Argument(help="Views to materialise (default: all).")] = None,
    database_url: str = _DB,
    redis_url: str = typer.Option(..., envvar="REDIS_URL", help="Redis of the online store."),
    redis_prefix: str = typer.Option("features:", envvar="FEATURES_REDIS_PREFIX"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Copy the newest offline values into the online store (incremental, idempotent)."""
    from services.chassis.clients import db_engine, redis_client
    from services.chassis.errors import AppError

    from .service import FeatureStore

    async def main():
        engine = db_engine(database_url, pool_size=2)
        redis = redis_client(redis_url)
        try:
            store = FeatureStore(engine, redis, prefix=redis_prefix)
            names = list(views or (await store.registry(fresh=True)).views)
            with _progress(as_json) as bar:
                task = bar.add_task("materialise", total=len(names))
                return await store.materialize(names, progress=lambda _: bar.advance(task))
        finally:
            await redis.aclose()
            await engine.dispose()

    try:
        results = asyncio.run(main())
    except AppError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(results, default=str))
        return
    for r in results:
        typer.echo(f"{r.get('view')}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "view"))


@app.command("rotate-pii-key")
def rotate_pii_key(
    database_url: str = _DB,
    redis_url: str | None = typer.Option(None, envvar="REDIS_URL", help="Redis of the online store "
                                         "(default: offline store only)."),
    redis_prefix: str = typer.Option("features:", envvar="FEATURES_REDIS_PREFIX"),
) -> None:
    """Re-encrypt every PII feature value with the first key of FEATURES_PII_KEYS (docs/privacy.md).

    Put the new key first and keep the old ones in FEATURES_PII_KEYS on every features replica,
    run this, then drop the old keys."""
    from services.chassis.clients import db_engine, redis_client
    from services.chassis.errors import AppError

    from .privacy import rotate_pii
    from .service import FeatureStore

    async def main():
        engine = db_engine(database_url, pool_size=2)
        redis = redis_client(redis_url) if redis_url else None
        try:
            return await rotate_pii(FeatureStore(engine, redis, prefix=redis_prefix))
        finally:
            await engine.dispose()
            if redis is not None:
                await redis.aclose()

    try:
        report = asyncio.run(main())
    except AppError as exc:
        _fail(exc)
    typer.echo(f"re-encrypted {report['offline_rows']} offline rows and {report['online_values']} online values "
               f"(views: {', '.join(report['views']) or 'none with PII features'})")
