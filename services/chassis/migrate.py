"""Run a service's Alembic migrations into its own schema (services/<name>/migrations/versions)."""
from __future__ import annotations

import importlib
from pathlib import Path

from alembic import command
from alembic.config import Config

from .clients import asyncpg_url

# Services that own a Postgres schema (DESIGN.md); each has migrations/versions in its package.
SCHEMA_OWNERS = ("auth", "orchestrator", "features", "pipeline")


def alembic_config(service: str, database_url: str) -> Config:
    pkg = Path(importlib.import_module(f"services.{service}").__file__).parent
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("version_locations", str(pkg / "migrations" / "versions"))
    cfg.attributes["schema"] = service
    cfg.attributes["url"] = asyncpg_url(database_url)
    return cfg


def upgrade(service: str, database_url: str, revision: str = "head") -> None:
    """Blocking (Alembic drives its own event loop): call from a thread or a CLI, not a coroutine."""
    command.upgrade(alembic_config(service, database_url), revision)


def upgrade_all(database_url: str) -> None:
    for service in SCHEMA_OWNERS:
        upgrade(service, database_url)
