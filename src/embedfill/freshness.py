"""Freshness: what embedfill wrote, from which text, with which model.

For every row embedfill writes it records, in ``embedfill.provenance`` (never in the
user's table), the row's id, the md5 of the exact text it embedded (as rendered from the
template, before truncation), the model (provider kind, model name, dimensions) and when;
the write and the record are one statement (target_sql.write). Against that record the
server sorts each row with a vector into

- ``unverified``: no provenance (written by other code, or before embedfill kept it;
  ``embedfill adopt`` records it),
- ``outdated_model``: written with another model or dimensions than configured now,
- ``stale``: written with this model, from other text than the row renders now (the app
  edited it, or the text template changed),
- fresh: the rest.

A changed model wins over changed text: such a row is ``outdated_model``, not ``stale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from .config import ProviderConfig, TargetConfig
from .db.catalog import TableInfo
from .db.store import Store

UNKNOWN = -1  # an id no provenance row has: what is never recorded matches nothing


@dataclass(frozen=True)
class ModelIdentity:
    provider: str
    model: str
    dimensions: int

    def __str__(self) -> str:
        return f"{self.provider}:{self.model} ({self.dimensions} dimensions)"


def model_identity(pconf: ProviderConfig, info: TableInfo) -> ModelIdentity:
    """The model as configured now: provider kind, model name and the vectors' size (the
    provider's ``dimensions``, else the column's, else the model's known size)."""
    dims = pconf.dimensions or info.dimensions or pconf.expected_dimensions or 0
    return ModelIdentity(pconf.kind, pconf.model, dims)


@dataclass(frozen=True)
class ProvenanceIds:
    """The numbers a provenance row is keyed by, as statement parameters."""

    column_id: int
    model_id: int

    def params(self) -> dict[str, Any]:
        return {"column_id": self.column_id, "model_id": self.model_id}


async def provenance_ids(
    conn: psycopg.AsyncConnection[Any],
    info: TableInfo,
    column: str,
    model: ModelIdentity,
    *,
    create: bool,
) -> ProvenanceIds:
    """The target column's and the model's numbers. ``create`` (a writer) records them
    when new; a reader gets ``UNKNOWN`` for what was never recorded (no row matches it)."""
    store = Store(conn)
    column_id = await store.vector_column_id(info.oid, column, create=create)
    model_id = await store.model_id(model.provider, model.model, model.dimensions, create=create)
    return ProvenanceIds(
        UNKNOWN if column_id is None else column_id, UNKNOWN if model_id is None else model_id
    )


async def model_change(
    conn: psycopg.AsyncConnection[Any],
    target: TargetConfig,
    pconf: ProviderConfig,
    info: TableInfo,
    *,
    doing: str = "keeping it filled now",
    override: str | None = "--allow-model-change",
) -> str | None:
    """One sentence when vectors of the target's column were written with another model
    than the one configured now (``doing`` would re-embed them in place, silently, while
    the app searches them; ``override``: the flag that does it anyway); None when none
    was."""
    written = await _written_otherwise(conn, target, pconf, info)
    if written is None:
        return None
    return (
        f"{written}, so {doing} would re-embed them in place while your app searches "
        "them; re-embed deliberately with `embedfill backfill --refresh "
        f"--target {target.name}` (it warns first)"
        + (f", or pass {override}." if override else ".")
    )


async def _written_otherwise(
    conn: psycopg.AsyncConnection[Any], target: TargetConfig, pconf: ProviderConfig, info: TableInfo
) -> str | None:
    """The start of a sentence that names the other models provenance records for the
    target's column ("Target … is configured with …, but N of its vectors were written
    with …"); None when there are none."""
    model = model_identity(pconf, info)
    ids = await provenance_ids(conn, info, target.embedding_column, model, create=False)
    if ids.column_id == UNKNOWN:
        return None  # nothing recorded for the column yet
    cur = await conn.execute(info.sql(target).other_models(), ids.params())
    others = [(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in await cur.fetchall()]
    if not others:
        return None
    provider, name, dims, _ = others[0]
    other = str(ModelIdentity(provider, name, dims))
    if len(others) > 1:
        other += f" and {len(others) - 1} other model{'s' if len(others) > 2 else ''}"
    rows = sum(r[3] for r in others)
    return (
        f"Target {target.name!r} is configured with {model}, but {rows:,} of its vectors "
        f"were written with {other}"
    )


async def filling_warning(
    conn: psycopg.AsyncConnection[Any], target: TargetConfig, pconf: ProviderConfig, info: TableInfo
) -> str | None:
    """What a backfill of NULL rows with the model configured now does to a column that
    holds vectors of another (a config changed, and a backfill run with it), in one
    sentence; None when the column holds none. The watch refuses it (model_change); a
    backfill, asked for, goes on and says so."""
    written = await _written_otherwise(conn, target, pconf, info)
    if written is None:
        return None
    return (
        f"{written}: the rows this backfill fills get vectors of another "
        "model than theirs, and similarity searches across the two are meaningless; "
        f"re-embed the others too with `embedfill backfill --refresh --target {target.name}`, "
        "or change the model without downtime with `embedfill model start`."
    )


def mixing_warning(target: str, outdated: int) -> str:
    """What a refresh of outdated-model rows in place does meanwhile, in one sentence."""
    return (
        f"{outdated:,} rows of target {target!r} hold vectors of another model or size than "
        "configured now; until this refresh finishes the column mixes two vector spaces, "
        "so similarity searches across them are meaningless (to avoid it, fill a new "
        "column as a new target and switch the app over when it is done)."
    )
