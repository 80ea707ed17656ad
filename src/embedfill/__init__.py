"""embedfill: find, fill and keep filled the pgvector embeddings your tables are missing.

The library is the CLI's twin::

    import embedfill
    report = embedfill.backfill("embedfill.toml", target="tickets", dry_run=True)
    print(report.missing_before, report.tokens, report.estimated_cost_usd)

Each function takes an explicit config (a ``Config``, a path, or None for the built-in
demo target) and an optional ``database_url``; without one it uses ``DATABASE_URL``, else
the embedded PostgreSQL. Async twins (``abackfill``, ``astatus``) serve callers that
already run an event loop.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import Config, ProviderConfig, TargetConfig, load_config
from .db.connect import Database, resolve_database
from .engine import BackfillOptions, abackfill, astatus
from .errors import (
    ConfigError,
    DatabaseError,
    EmbedfillError,
    ExtensionMissing,
    ProviderError,
    RunAborted,
    SchemaMismatch,
    TargetBusy,
    TargetNotFound,
    UsageError,
)
from .models import Report, TargetStatus, TenantReport

__version__ = "0.1.0"


def _config(config: Config | str | Path | None) -> Config:
    return config if isinstance(config, Config) else load_config(config)


def database(database_url: str | None = None) -> Database:
    """The database to use: ``database_url``, else DATABASE_URL, else the embedded server
    (announced on stderr)."""
    if database_url:
        return Database(url=database_url)
    return resolve_database(notice=lambda m: print(m, file=sys.stderr))


def backfill(
    config: Config | str | Path | None = None,
    *,
    target: str | None = None,
    dry_run: bool = False,
    batch_size: int | None = None,
    tenants: Sequence[str] = (),
    limit: int | None = None,
    database_url: str | None = None,
    actor: str = "library",
) -> Report:
    """Embed the rows of ``target`` whose embedding is NULL (or, with ``dry_run``, report
    what that would send and cost). Returns the same Report the CLI prints."""
    opts = BackfillOptions(
        target=target,
        dry_run=dry_run,
        batch_size=batch_size,
        tenants=tuple(tenants),
        limit=limit,
        actor=actor,
    )
    return asyncio.run(abackfill(_config(config), database(database_url), opts))


def status(
    config: Config | str | Path | None = None,
    *,
    target: str | None = None,
    database_url: str | None = None,
) -> list[TargetStatus]:
    """Rows, missing embeddings and vector index per target (and per tenant)."""
    return asyncio.run(astatus(_config(config), database(database_url), target))


__all__ = [
    "BackfillOptions",
    "Config",
    "ConfigError",
    "Database",
    "DatabaseError",
    "EmbedfillError",
    "ExtensionMissing",
    "ProviderConfig",
    "ProviderError",
    "Report",
    "RunAborted",
    "SchemaMismatch",
    "TargetBusy",
    "TargetConfig",
    "TargetNotFound",
    "TargetStatus",
    "TenantReport",
    "UsageError",
    "abackfill",
    "astatus",
    "backfill",
    "database",
    "load_config",
    "status",
]
