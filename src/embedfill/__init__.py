"""embedfill: find, fill and keep filled the pgvector embeddings your tables are missing.

The library is the CLI's twin::

    import embedfill
    report = embedfill.backfill("embedfill.toml", target="tickets", dry_run=True,
                                database_url="postgresql://app@db/app")
    print(report.missing_before, report.tokens, report.estimated_cost_usd)

Each function takes an explicit config (a ``Config``, a path, or None for the built-in
demo target) and a database: ``database_url=``, or ``database=`` (a ``Database``), else
``DATABASE_URL``; without any, a ``ConfigError`` (the embedded server is an explicit
choice: ``database=embedfill.database(embedded=True)``). A ``Config`` can be built in
code with ``embedfill.parse_config({...})`` (the TOML's shape as a dict) or from the
dataclasses ``Config``, ``ProviderConfig`` and ``TargetConfig``. Async twins
(``abackfill``, ``astatus``) serve callers that already run an event loop.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .application import (
    BackfillOptions,
    ProgressCallback,
    aactive,
    aadopt,
    abackfill,
    astatus,
    averify,
)
from .config import Config, ProviderConfig, TargetConfig, load_config, parse_config
from .db.connect import Database, default_data_dir, start_embedded, url_from_env
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
    VerificationFailed,
)
from .migration import ActiveModel
from .models import Report, TargetStatus, TenantReport
from .verify import AdoptResult, VerifyResult

__version__ = "0.1.0"


def _config(config: Config | str | Path | None) -> Config:
    return config if isinstance(config, Config) else load_config(config)


NO_DATABASE = (
    "No database: pass database_url=... or set DATABASE_URL "
    "(embedfill.database(embedded=True) uses the bundled server)."
)


def database(database_url: str | None = None, *, embedded: bool = False) -> Database:
    """The database for library calls: ``database_url``, else ``DATABASE_URL``, else,
    only when asked with ``embedded=True``, the bundled embedded PostgreSQL (data in
    ``EMBEDFILL_DATA_DIR`` or the per-user directory; announced on stderr). Without any
    of them, ``ConfigError``: a library call never falls back to an empty local
    database by surprise."""
    if database_url:
        return Database(url=database_url)
    url = url_from_env(os.environ)
    if url:
        return Database(url=url)
    if not embedded:
        raise ConfigError(NO_DATABASE)
    data_dir = default_data_dir(os.environ)
    print(f"embedfill: using the embedded PostgreSQL (data in {data_dir}).", file=sys.stderr)
    return start_embedded(data_dir, lambda m: print(m, file=sys.stderr))


def _database(db: Database | None, database_url: str | None) -> Database:
    return db if db is not None else database(database_url)


def backfill(
    config: Config | str | Path | None = None,
    *,
    target: str | None = None,
    dry_run: bool = False,
    batch_size: int | None = None,
    tenants: Sequence[str] = (),
    limit: int | None = None,
    database_url: str | None = None,
    database: Database | None = None,
    actor: str = "library",
    on_progress: ProgressCallback | None = None,
    exclusive: bool = False,
    enqueue: bool = False,
    refresh: bool = False,
) -> Report:
    """Embed the rows of ``target`` whose embedding is NULL (or, with ``dry_run``, report
    what that would send and cost, which rows would fail, and two sample texts). Returns
    the same Report the CLI prints.

    The backfill is a job other workers (``embedfill worker``, another ``backfill``) may
    share: a job of this target already running is joined (``report.joined``), unless
    ``exclusive`` (then ``TargetBusy``). ``enqueue`` only creates the job and returns.
    ``refresh`` also re-embeds stale and outdated-model rows (``report.stale_before``,
    ``report.refreshed``).

    ``on_progress(report)`` is called with the live ``Report`` as the run goes (at most
    every 0.1 s, from the thread running the backfill) and once at the end. Progress is
    ``report.embedded + report.skipped + report.failed`` of ``report.missing_before``.
    The object keeps changing after the call returns: copy what you keep. The callback
    runs on the backfill's event loop, between batches: keep it quick.
    """
    opts = BackfillOptions(
        target=target,
        dry_run=dry_run,
        batch_size=batch_size,
        tenants=tuple(tenants),
        limit=limit,
        actor=actor,
        refresh=refresh,
    )
    db = _database(database, database_url)
    return asyncio.run(
        abackfill(
            _config(config),
            db,
            opts,
            on_progress=on_progress,
            exclusive=exclusive,
            enqueue=enqueue,
        )
    )


def status(
    config: Config | str | Path | None = None,
    *,
    target: str | None = None,
    database_url: str | None = None,
    database: Database | None = None,
) -> list[TargetStatus]:
    """Rows, missing embeddings, stale, outdated-model and unverified vectors and the
    vector index, per target (and per tenant)."""
    return asyncio.run(astatus(_config(config), _database(database, database_url), target))


def active(
    target: str,
    config: Config | str | Path | None = None,
    *,
    database_url: str | None = None,
    database: Database | None = None,
) -> ActiveModel:
    """Which vectors ``target``'s searches use now: ``schema``, ``relation`` and
    ``column`` to search, and the ``provider``, ``model`` and ``dimensions`` to embed the
    query with. The live column until a ``model cutover``; the new vectors from then on
    (and the live column again after a ``model rollback``). Read it when the app starts
    and now and then (it changes only at a cutover or a rollback)."""
    return asyncio.run(aactive(_config(config), _database(database, database_url), target))


__all__ = [
    "ActiveModel",
    "AdoptResult",
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
    "VerificationFailed",
    "VerifyResult",
    "aactive",
    "aadopt",
    "abackfill",
    "active",
    "astatus",
    "averify",
    "backfill",
    "database",
    "load_config",
    "parse_config",
    "status",
]
