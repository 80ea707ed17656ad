"""A run's start: the options checked, the target checked against the live table, the
provider's token counter loaded. Everything here fails before anything is read or sent."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from ..config import Config, ProviderConfig, TargetConfig
from ..db.catalog import TableInfo, inspect_target
from ..errors import UsageError
from ..providers import Provider
from .state import BackfillOptions


async def prepare(
    conn: psycopg.AsyncConnection[Any],
    config: Config,
    opts: BackfillOptions,
    provider: Provider,
) -> tuple[TargetConfig, ProviderConfig, TableInfo]:
    """The target, its provider's config and the live table's shape, once the options
    and the table are checked (UsageError, or a ConfigError naming what is wrong)."""
    target = config.target(opts.target)
    pconf = config.provider_for(target)
    if opts.batch_size is not None and not 1 <= opts.batch_size <= 2048:
        raise UsageError(f"--batch-size must be between 1 and 2048, not {opts.batch_size}.")
    if opts.limit is not None and opts.limit < 1:
        raise UsageError(f"--limit must be at least 1, not {opts.limit}.")
    if any("\x00" in t for t in opts.tenants):
        raise UsageError("A tenant id cannot contain a NUL character; PostgreSQL text cannot.")
    if opts.tenants and not target.tenant_column:
        raise UsageError(
            f"Target {target.name!r} has no tenant_column, so --tenant cannot select rows."
        )
    info = await inspect_target(
        conn, target, await provider.dimensions(), pconf.label, write=not opts.dry_run
    )
    # load the token counter (a local model's tokenizer) now: a failure is a config error
    # before anything is read or written, and the run itself starts ready
    await asyncio.to_thread(provider.counter)
    return target, pconf, info
