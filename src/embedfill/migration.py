"""Changing the model (``embedfill model …``): the plan, before anything is done.

A change of model writes a second set of vectors beside the live one, with the provider
section ``--to`` names, in one of two homes (the *strategy*):

- ``table`` (the default): a side table keyed by the row id, in the target table's
  schema. The live table is only read (ACCESS SHARE): no rewrite, and the fill does not
  touch the live column's HNSW graph.
- ``column``: a shadow column on the live table, for apps that need the vector in the
  row. Adding it takes a brief ACCESS EXCLUSIVE lock, and every fill UPDATE writes a new
  version of its row, which also inserts into every index of the table, the live
  column's HNSW graph included (measured about 5x slower than the side table).

``start`` makes that home, fills it as a job of a *derived target* (the live target's
text, the new provider, the new home: ``derived_target``), so the scan, the guarded
write, keys, limits, provenance and verify are those of any target, then builds the
twin of each live vector index. ``status`` says how far it is.

``plan`` reads and counts, and changes nothing: the rows and tokens to embed (tokens
counted on a random sample of rows with the new provider's tokenizer), the cost, the
fill's time at the provider's configured limits, each vector index to build like the
live column's (same method, operator class and parameters) with a rough build time and
size, the disk the new vectors need, and each step with the locks it takes. It refuses,
in one sentence, what cannot work (vectors too wide for the live column's index method).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from .config import Config, ProviderConfig, TableName, TargetConfig, in_side_table, text_renderer
from .db import homes
from .db.catalog import TableInfo, inspect_target
from .db.indexes import VectorIndex, expression_indexes, vector_indexes
from .db.queries import SNAPSHOT, TYPE_EXISTS
from .db.store import Store
from .db.target_sql import BLANK, base_type, unquoted
from .errors import EmbedfillError as EmbedfillErrorBase
from .errors import PlanRefused, UsageError
from .freshness import ModelIdentity, model_identity, provenance_ids
from .planning import estimate_cost, prepare_text
from .providers import make_provider

log = logging.getLogger(__name__)

STRATEGIES = ("table", "column")
# pgvector's limits on what hnsw and ivfflat index, by vector type
INDEX_MAX_DIMENSIONS = {"vector": 2000, "halfvec": 4000}
VECTOR_KINDS = ("vector", "halfvec")  # what --vector-type may name
SAMPLE_ROWS = 1000  # rows whose tokens are counted (every row of a smaller table)
EXACT_ROWS = 5000  # up to this many rows, every row is counted
# HNSW build speed measured here (m=16, ef_construction=64, 2 cores): about 3,000 rows/s
# at 384 dimensions, falling with the width; ivfflat builds about ten times faster
HNSW_ROWS_PER_S_AT_384 = 3000.0
IVFFLAT_SPEEDUP = 10.0
SIDE_ROW_OVERHEAD = 56  # tuple header, id, text md5 and alignment of a side-table row
NAME_MAX = 63  # PostgreSQL's identifier length, in bytes


@dataclass(frozen=True)
class Step:
    step: str
    does: str
    locks: str
    blocks_app: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class IndexPlan:
    """One vector index of the live column, and its twin on the new vectors."""

    method: str
    opclass: str
    parameters: dict[str, str]
    expression: str  # the twin's column cast to this type ("public.halfvec(3072)"), or ""
    live: str  # the live index's definition (pg_get_indexdef)
    build_seconds: float  # a rough estimate: see HNSW_ROWS_PER_S_AT_384
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelPlan:
    target: str
    strategy: str
    from_model: dict[str, Any]
    to_model: dict[str, Any]
    home: dict[str, str]  # where the new vectors go: relation (and column)
    rows: int
    embeddable_rows: int
    tokens: int
    tokens_estimated: bool
    sample_rows: int
    requests: int
    cost_usd: float  # at the provider's price (0 for a local model)
    fill_seconds: float | None  # at the provider's rpm/tpm; None: no limit configured
    fill_bound: str  # what bounds fill_seconds: "tpm", "rpm" or "none"
    indexes: list[IndexPlan]
    disk_bytes: dict[str, int]
    steps: list[Step]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["from"] = out.pop("from_model")
        out["to"] = out.pop("to_model")
        out["indexes"] = [i.to_dict() for i in self.indexes]
        out["steps"] = [s.to_dict() for s in self.steps]
        return out


def stored_type(column_type: str, kind: str) -> str:
    """Type ``kind`` (``vector``, ``halfvec``) named in the schema ``column_type`` names
    (``extensions.vector`` and halfvec: ``extensions.halfvec``)."""
    schema, dot, _ = column_type.rpartition(".")
    return f"{schema}{dot}{kind}"


def retyped_opclass(opclass: str, live_type: str, new_type: str) -> str:
    """A live index's operator class for the new vectors' type (both types as statements
    name them: ``public.vector``, ``halfvec``): ``vector_cosine_ops`` is
    ``halfvec_cosine_ops`` for halfvec (the same distance). The live type's default
    class (an IVFFlat definition that names none: ``vector_l2_ops``) is named for the new
    type, whose L2 classes are no default; of the same type, kept."""
    kind, was = base_type(new_type), base_type(live_type)
    if kind == was:
        return opclass
    if not opclass:
        return default_opclass(new_type)
    schema, dot, name = opclass.rpartition(".")
    if name.startswith(f"{was}_"):
        return f"{schema}{dot}{kind}_{name[len(was) + 1 :]}"
    return opclass


def default_opclass(vector_type: str) -> str:
    """The class an IVFFlat index definition that names none uses for columns of
    ``vector_type`` (as statements name it: ``public.vector``): its L2 class, in the
    type's schema (HNSW has no default class: its definitions always name one)."""
    schema, dot, _ = vector_type.rpartition(".")
    return f"{schema}{dot}{base_type(vector_type)}_l2_ops"


def vector_bytes(kind: str, dimensions: int) -> int:
    """One stored vector's size: a 8-byte header and 4 (vector) or 2 (halfvec) bytes a
    dimension."""
    return 8 + (2 if kind == "halfvec" else 4) * dimensions


# a definition's end: its WITH list (values quoted: m='16'), then a partial index's WHERE,
# which a twin does not copy (a side table has none of the columns it names)
_WITH = r"(?: WITH \(((?:[^()']|'(?:[^']|'')*')*)\))?(?: WHERE .*)?$"
_INDEX_DEF = re.compile(r" USING (\w+) \((.*?)\)" + _WITH)
# an identifier as the server writes it: quoted where it must be (spaces, capitals, dots)
_IDENT = r'(?:"(?:[^"]|"")*"|[^\s".]+)'
# the operator class that ends a key column's text (``emb "My Ext".vector_cosine_ops``)
_OPCLASS = re.compile(rf"\s((?:{_IDENT}\.)?{_IDENT})$")


def index_parts(index: VectorIndex) -> tuple[str, str, str]:
    """(method, operator class, parameters) of a vector index's definition, as the
    server writes them (the parameters as its ``WITH`` list: ``m='16', ...``)."""
    match = _INDEX_DEF.search(index.definition)
    if match is None:
        return index.method, "", ""
    method, column, params = match.groups()
    named = _OPCLASS.search(column)  # the key column's class, when the definition names one
    return method, named[1] if named else "", params or ""


# an index on the column cast to halfvec, as the server writes its definition (pgvector's
# way to index vectors of more dimensions than HNSW takes: ((emb)::halfvec(3072)))
_CAST_DEF = re.compile(
    rf" USING (\w+) \(\(\(({_IDENT})\)::((?:{_IDENT}\.)?halfvec)\(\d+\)\)"
    rf" ((?:{_IDENT}\.)?{_IDENT})\)" + _WITH
)


def cast_parts(index: VectorIndex, column: str) -> tuple[str, str, str, str] | None:
    """(method, the cast's type, operator class, parameters) of an index on ``column``
    cast to halfvec; None for any other expression (no twin is built for it)."""
    match = _CAST_DEF.search(index.definition)
    if match is None or unquoted(match[2]) != column:
        return None
    return match[1], match[3], match[4], match[5] or ""


def parse_index(index: VectorIndex) -> tuple[str, str, dict[str, str]]:
    """(method, operator class, parameters) of a vector index's definition."""
    method, opclass, params = index_parts(index)
    return method, opclass, parse_parameters(params)


def parse_parameters(params: str) -> dict[str, str]:
    """An index definition's ``WITH`` list (``m='16', ef_construction='64'``)."""
    parameters: dict[str, str] = {}
    for item in params.split(","):
        if "=" in item:
            key, value = item.split("=", 1)
            parameters[key.strip()] = value.strip().strip("'")
    return parameters


def index_plan(
    index: VectorIndex,
    rows: int,
    live_type: str,
    new_type: str,
    dimensions: int,
    cast: tuple[str, str, str, str] | None = None,
) -> IndexPlan:
    """The twin of ``index`` to build: its class for the new type, its time and size
    (``cast``: cast_parts of an index on the column cast to halfvec, whose twin is on
    the new vectors cast the same way)."""
    if cast is not None:
        method, cast_type, opclass, params = cast
        parameters = parse_parameters(params)
        kind = base_type(cast_type)
    else:
        method, opclass, parameters = parse_index(index)
        opclass = retyped_opclass(opclass, live_type, new_type)
        kind = base_type(new_type)
    per_s = HNSW_ROWS_PER_S_AT_384 * 384 / max(dimensions, 1)
    if method == "ivfflat":
        per_s *= IVFFLAT_SPEEDUP
        per_row = vector_bytes(kind, dimensions) + 16
    else:
        m = int(parameters.get("m", "16") or 16)
        per_row = vector_bytes(kind, dimensions) + 12 * m + 40  # the layer-0 neighbours
    return IndexPlan(
        method=method,
        opclass=opclass,
        parameters=parameters,
        expression=f"{cast[1]}({dimensions})" if cast is not None else "",
        live=index.definition,
        build_seconds=round(rows / per_s, 1),
        bytes=int(rows * per_row / 0.9),  # pages are filled to about 90 %
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "model"


def fit_name(*parts: str) -> str:
    """``parts`` joined by ``_``, cut to PostgreSQL's 63 bytes with a digest of the
    whole so that two long names never meet."""
    name = "_".join(parts)
    if len(name.encode()) <= NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    head = name.encode()[: NAME_MAX - 9].decode("utf-8", "ignore")
    return f"{head}_{digest}"


def home_of(
    target: TargetConfig, info: TableInfo, to: ProviderConfig, strategy: str
) -> dict[str, str]:
    """Where the new vectors go: a side table in the target table's schema, or a shadow
    column on the table."""
    slug = _slug(to.name)
    if strategy == "table":
        table = target.table.name
        return {
            "schema": info.schema,
            "relation": fit_name(table, target.embedding_column, slug),
            "column": "embedding",
        }
    return {
        "schema": info.schema,
        "relation": target.table.name,
        "column": fit_name(target.embedding_column, slug),
    }


def steps_of(
    strategy: str, table: str, home: dict[str, str], indexes: list[VectorIndex]
) -> list[Step]:
    side = f"{home['schema']}.{home['relation']}"
    old = ", ".join(i.name for i in indexes) or "none"
    if strategy == "table":
        return [
            Step(
                "create",
                f"CREATE TABLE {side} (row id, tenant, vector; each vector's provenance is"
                " kept beside the live column's)",
                f"none on {table}; ACCESS EXCLUSIVE on the new table",
                "no",
            ),
            Step(
                "fill",
                f"a job: INSERT ... ON CONFLICT into {side}, reading {table}",
                f"ACCESS SHARE on {table} (reads); ROW EXCLUSIVE on {side}",
                "no",
            ),
            Step(
                "index",
                f"CREATE INDEX CONCURRENTLY on {side}, like the live column's",
                f"SHARE UPDATE EXCLUSIVE on {side}; waits for transactions older than it",
                "no",
            ),
            Step("cutover", "records the switch in embedfill.active_models", "none", "no"),
            Step(
                "finalize",
                f"DROP INDEX CONCURRENTLY of the old index ({old}); ALTER TABLE {table} "
                "DROP COLUMN of the old vectors; the target then names the side table as "
                "its vectors in the config (embedding_table = "
                f"{json.dumps(home['relation'], ensure_ascii=False)})",
                "SHARE UPDATE EXCLUSIVE on the old index; ACCESS EXCLUSIVE on "
                f"{table} for the catalog change only, under a short lock_timeout",
                "for milliseconds; a prepared SELECT * fails once (its result type changed)",
            ),
        ]
    column = home["column"]
    return [
        Step(
            "create",
            f"ALTER TABLE {table} ADD COLUMN {column} (nullable, no default: catalog only)",
            f"ACCESS EXCLUSIVE on {table}, under a short lock_timeout",
            "for milliseconds; a prepared SELECT * fails once (its result type changed)",
        ),
        Step(
            "fill",
            f"a job: UPDATE {table} SET {column}; each UPDATE writes a new row version, "
            f"which also inserts into every index of {table} (the old vectors' {old} too)",
            f"ROW EXCLUSIVE on {table} and its indexes; the rows written, one batch at a time",
            "no, but every row of the table is rewritten once",
        ),
        Step(
            "index",
            f"CREATE INDEX CONCURRENTLY on {table} ({column}), like the live column's",
            f"SHARE UPDATE EXCLUSIVE on {table}; waits for transactions older than it",
            "no",
        ),
        Step("cutover", "records the switch in embedfill.active_models", "none", "no"),
        Step(
            "finalize",
            f"DROP INDEX CONCURRENTLY of the old index ({old}); ALTER TABLE {table} "
            "DROP COLUMN of the old vectors",
            "SHARE UPDATE EXCLUSIVE on the old index; ACCESS EXCLUSIVE on "
            f"{table} for the catalog change only, under a short lock_timeout",
            "for milliseconds; a prepared SELECT * fails once (its result type changed)",
        ),
    ]


def fill_time(tokens: int, requests: int, to: ProviderConfig) -> tuple[float | None, str]:
    """Seconds the fill takes at the provider's configured limits, and which one binds
    (None, "none": no limit configured, the provider's own speed decides)."""
    by_tokens = tokens / to.tpm * 60 if to.tpm else None
    by_requests = requests / to.rpm * 60 if to.rpm else None
    if by_tokens is None and by_requests is None:
        return None, "none"
    if by_requests is None or (by_tokens is not None and by_tokens >= by_requests):
        assert by_tokens is not None
        return round(by_tokens, 1), "tpm"
    return round(by_requests, 1), "rpm"


async def plan(
    conn: psycopg.AsyncConnection[Any],
    config: Config,
    target_name: str,
    to_name: str,
    strategy: str = "table",
    vector_type: str | None = None,
) -> ModelPlan:
    """What changing ``target_name``'s model to provider section ``to_name`` takes
    (see the module doc). Read-only. ``vector_type`` (``vector`` or ``halfvec``): the
    new vectors' type; None: the live column's."""
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy must be table or column, not {strategy!r}.")
    if vector_type is not None and vector_type not in VECTOR_KINDS:
        raise UsageError(f"--vector-type must be vector or halfvec, not {vector_type!r}.")
    target = config.target(target_name)
    if target.side_of is not None:
        raise PlanRefused(
            f"Target {target.name!r} keeps its vectors in the side table {target.table} "
            "(embedding_table), and a change of model from a side table is not built yet; "
            "keep its model until it is (re-embedding it in place would mix two models in "
            "the app's searches, and embedfill.active() would still name this one)."
        )
    current = config.provider_for(target)
    to = config.providers.get(to_name)
    if to is None:
        have = ", ".join(sorted(config.providers)) or "none"
        raise PlanRefused(
            f"--to {to_name!r} names no provider section of the config (there are: {have}); "
            f"add [providers.{to_name}] with the new model."
        )
    info = await inspect_target(conn, target, current.expected_dimensions, current.label)
    new_dims = to.expected_dimensions
    if new_dims is None:
        raise PlanRefused(
            f"The size of {to.label}'s vectors is unknown; set dimensions in "
            f"[providers.{to.name}] so that the plan can size the new vectors and index."
        )
    was = model_identity(current, info)
    if (to.kind, to.model, new_dims) == (was.provider, was.model, was.dimensions):
        if vector_type is not None and vector_type != info.types.kind:
            raise PlanRefused(
                f"Target {target.name!r} already holds {was.provider}:{was.model} vectors "
                f"of {was.dimensions} dimensions; a change of their type alone re-embeds "
                f"nothing: ALTER TABLE … ALTER COLUMN … TYPE {vector_type}({was.dimensions}) "
                "converts them in place (under an ACCESS EXCLUSIVE lock; drop and rebuild "
                "the vector index with the new type's operator class)."
            )
        raise PlanRefused(
            f"Target {target.name!r} already holds {was.provider}:{was.model} vectors of "
            f"{was.dimensions} dimensions; --to {to.name!r} is the same model, so there is "
            "nothing to change (use `backfill --refresh` to re-embed in place)."
        )
    kind = vector_type or info.types.kind
    if kind != info.types.kind:
        cur = await conn.execute(TYPE_EXISTS, (stored_type(info.types.vector_type, kind),))
        found = await cur.fetchone()
        if found is None or found[0] is None:
            raise PlanRefused(
                f"This database's pgvector has no {kind} type (it came with pgvector 0.7); "
                "run ALTER EXTENSION vector UPDATE, or leave --vector-type out."
            )
    live_indexes = await vector_indexes(conn, info.oid, target.embedding_column)
    on_expressions = await expression_indexes(conn, info.oid, target.embedding_column)
    casts = [(i, cast_parts(i, target.embedding_column)) for i in on_expressions]
    halfvec_limit = INDEX_MAX_DIMENSIONS["halfvec"]
    cast_names = [i.name for i, cast in casts if cast is not None]
    if cast_names and new_dims > halfvec_limit:
        raise PlanRefused(
            f"{to.label} gives {new_dims}-dimension vectors, and the index "
            f"{cast_names[0]} casts the live column to halfvec, which pgvector indexes up "
            f"to {halfvec_limit:,} dimensions; set dimensions = {halfvec_limit} or fewer in "
            f"[providers.{to.name}]."
        )
    limit = INDEX_MAX_DIMENSIONS.get(kind, INDEX_MAX_DIMENSIONS["vector"])
    if live_indexes and new_dims > limit:
        method = live_indexes[0].method
        halfvec = INDEX_MAX_DIMENSIONS["halfvec"]
        offer = (
            f", or pass --vector-type halfvec (2 bytes a dimension, indexed up to {halfvec:,})"
            if kind == "vector" and new_dims <= halfvec
            else ""
        )
        raise PlanRefused(
            f"{to.label} gives {new_dims}-dimension vectors, and pgvector's {method} index "
            f"(the live column's) takes {kind} of at most {limit:,}; set dimensions = "
            f"{limit} or fewer in [providers.{to.name}] (text-embedding-3 models shorten "
            f"their vectors on request){offer}."
        )
    tsql = info.sql(target)
    cur = await conn.execute(tsql.count_embeddable(), {"blank": BLANK})
    counted = await cur.fetchone()
    rows, embeddable = (int(counted[0]), int(counted[1])) if counted else (0, 0)

    # tokens: the new provider's tokenizer over a random sample of the rows' texts
    exact = rows <= EXACT_ROWS
    percent = 100.0 if exact else min(100.0, 100.0 * SAMPLE_ROWS * 4 / rows)
    cur = await conn.execute(
        tsql.text_sample(), {"percent": percent, "limit": rows if exact else SAMPLE_ROWS}
    )
    sample = await cur.fetchall()
    counter = make_provider(to).counter()
    render = text_renderer(target.text, target.text_columns)
    sampled_tokens, sampled_texts = 0, 0
    for raw in sample:
        values = raw[2:-1]  # id, tenant, the text's values, the (NULL) vector
        prepared = prepare_text(
            render(values),
            count=counter.count,
            truncate=counter.truncate,
            max_tokens=to.input_token_limit,
        )
        if prepared is not None:
            sampled_texts += 1
            sampled_tokens += prepared[1]
    if exact or not sampled_texts:
        tokens = sampled_tokens if exact else 0
    else:
        tokens = round(sampled_tokens / sampled_texts * embeddable)
    requests = math.ceil(embeddable / max(1, to.batch_size))
    seconds, bound = fill_time(tokens, requests, to)

    home = home_of(target, info, to, strategy)
    new_type = stored_type(info.types.vector_type, kind)
    indexes = [
        index_plan(i, embeddable, info.types.vector_type, new_type, new_dims) for i in live_indexes
    ] + [
        index_plan(i, embeddable, info.types.vector_type, new_type, new_dims, cast)
        for i, cast in casts
        if cast is not None
    ]
    per_vector = vector_bytes(kind, new_dims)
    vectors = embeddable * (per_vector + (SIDE_ROW_OVERHEAD if strategy == "table" else 0))
    index_bytes = sum(i.bytes for i in indexes)
    warnings: list[str] = []
    if not indexes:
        warnings.append(
            f"The live column {target.embedding_column} has no vector index, so none is "
            "built for the new vectors either; searches on them scan the table."
        )
    others = [i.name for i, cast in casts if cast is None]
    if others:
        warnings.append(
            f"The vector index {', '.join(others)} is on an expression of "
            f"{target.embedding_column} other than a cast to halfvec: no twin is built for "
            "it and the recall gate does not measure it. Build its twin on the new vectors "
            "yourself (CREATE INDEX CONCURRENTLY, with the new model's width in the "
            "expression) before the cutover."
        )
    if strategy == "column":
        size = await _table_bytes(conn, info.oid)
        warnings.append(
            f"The column strategy rewrites every row of {target.table} once (about "
            f"{size:,} bytes more until VACUUM reclaims the old versions), and each "
            "UPDATE also inserts into the live column's index; the table strategy does "
            "neither."
        )
    cost = round(estimate_cost(tokens, to.price), 4)
    return ModelPlan(
        target=target.name,
        strategy=strategy,
        from_model={
            "provider": current.name,
            "kind": was.provider,
            "model": was.model,
            "dimensions": was.dimensions,
        },
        to_model={"provider": to.name, "kind": to.kind, "model": to.model, "dimensions": new_dims}
        # another type than the live column's (--vector-type), recorded with the change
        | ({"vector_type": kind} if kind != info.types.kind else {}),
        home=home,
        rows=rows,
        embeddable_rows=embeddable,
        tokens=tokens,
        tokens_estimated=not exact,
        sample_rows=len(sample),
        requests=requests,
        cost_usd=cost,
        fill_seconds=seconds,
        fill_bound=bound,
        indexes=indexes,
        disk_bytes={"vectors": vectors, "indexes": index_bytes, "total": vectors + index_bytes},
        steps=steps_of(strategy, f"{info.schema}.{target.table.name}", home, live_indexes),
        warnings=warnings,
    )


async def _table_bytes(conn: psycopg.AsyncConnection[Any], oid: int) -> int:
    cur = await conn.execute("SELECT pg_catalog.pg_table_size(%(rel)s)", {"rel": oid})
    row = await cur.fetchone()
    return int(row[0]) if row else 0


# ---------------------------------------------------------------------- start and status

PHASES = ("planned", "filling", "indexing", "ready", "cut_over", "finalized", "rolled_back")


def derived_name(target: str, provider: str) -> str:
    """The derived target's name: the live target's and the new provider section's."""
    return f"{target}@{provider}"


async def dropped_by_a_finalize(
    conn: psycopg.AsyncConnection[Any], target: str, table_oid: int, column: str, since: Any
) -> bool:
    """Whether ``target``'s vectors (``column`` of the table ``table_oid``) are gone
    because a change of model was finalized since then (a watch job's start): not a
    fault of the job (worker.py and watch.py end it quietly)."""
    if await Store(conn).column_exists(table_oid, column):
        return False  # there: whatever failed, it was not a finalize
    return await finalized_since(conn, target, since)


async def finalized_since(conn: psycopg.AsyncConnection[Any], target: str, since: Any) -> bool:
    """Whether a change of model whose live or new vectors are ``target``'s was finalized
    since then: its finalize dropped the old vectors (after a cutover) or the new ones
    (after a rollback), as it was asked to. (Target names hold no '@' but a derived
    target's: config.py refuses it.)"""
    for live, provider, cut_over in await Store(conn).finalized_migrations_since(since):
        if cut_over and target == live:
            return True
        if not cut_over and provider is not None and target == derived_name(live, provider):
            return True
    return False


def derived_target(
    target: TargetConfig, to: ProviderConfig, strategy: str, home: dict[str, Any]
) -> TargetConfig:
    """The new vectors as a target of their own: the live target's text and keys, the
    new provider, the new home (a side table's rows read their text from the live
    rows: ``in_side_table``)."""
    name = derived_name(target.name, to.name)
    if strategy == "column":
        return dataclasses.replace(
            target, name=name, embedding_column=home["column"], provider=to.name
        )
    live = dataclasses.replace(target, table=TableName(home["schema"], target.table.name))
    return dataclasses.replace(in_side_table(live, home["relation"], name=name), provider=to.name)


def with_target(config: Config, target: TargetConfig) -> Config:
    """``config`` with one more target (the derived one)."""
    others = tuple(t for t in config.targets if t.name != target.name)
    return dataclasses.replace(config, targets=(*others, target))


def twins(
    home: dict[str, Any],
    live: list[VectorIndex],
    live_type: str,
    new_type: str,
    *,
    expressions: Sequence[VectorIndex] = (),
    column: str = "",
    dimensions: int = 0,
) -> list[dict[str, str]]:
    """Each live vector index's twin on the new vectors: its name, method, operator
    class and parameters (as the server's definition of the live one writes them; the
    class of the same distance for new vectors of another type: retyped_opclass). An
    index on the live ``column`` cast to halfvec (``expressions``: cast_parts) has a
    twin on the new vectors cast to halfvec of their ``dimensions`` (``cast``)."""
    out: list[dict[str, str]] = []
    planned: list[tuple[VectorIndex, tuple[str, str, str, str] | None]] = [
        (index, None) for index in live
    ]
    planned += [(i, c) for i in expressions if (c := cast_parts(i, column)) is not None]
    for n, (index, cast) in enumerate(planned, 1):
        extra: dict[str, str] = {}
        if cast is not None:
            method, cast_type, opclass, params = cast
            extra = {"cast": cast_type, "dimensions": str(dimensions)}
        else:
            method, opclass, params = index_parts(index)
            opclass = retyped_opclass(opclass, live_type, new_type)
        suffix = method if n == 1 else f"{method}{n}"
        out.append(
            {
                "name": fit_name(home["relation"], home["column"], suffix),
                "method": method,
                "opclass": opclass,
                "params": params,
                "live": index.name,
                **extra,
            }
        )
    return out


@dataclass
class MigrationStatus:
    """``embedfill model status`` of one target (each field: docs/changing-models.md)."""

    target: str
    migration_id: int | None
    phase: str  # PHASES, or "none": no change of model on record
    strategy: str | None = None
    from_model: dict[str, Any] = field(default_factory=dict)
    to_model: dict[str, Any] = field(default_factory=dict)
    home: dict[str, Any] = field(default_factory=dict)
    rows: int = 0  # rows with text to embed
    coverage: float = 0.0  # of those, the share holding a new vector of their current text
    missing: int = 0  # rows with text and no new vector
    stale: int = 0  # rows whose new vector is of other text (or has no provenance)
    index: str = "none"  # none | building | valid | invalid
    gates: dict[str, Any] = field(default_factory=dict)
    active: str = "old"  # which vectors the app's searches use: old | new
    job_id: int | None = None
    updated_at: dt.datetime | None = None
    # what to do next, when the config no longer fits what happened (a finalize dropped
    # the column it names)
    next_step: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["from"] = out.pop("from_model")
        out["to"] = out.pop("to_model")
        if self.updated_at is not None:
            out["updated_at"] = self.updated_at.isoformat()
        return out


async def status_of(
    conn: psycopg.AsyncConnection[Any], config: Config, target: TargetConfig
) -> MigrationStatus:
    """How far the change of ``target``'s model is (the one under way, else the last)."""
    pconf = config.provider_for(target)
    store = Store(conn)
    try:
        info = await inspect_target(conn, target, pconf.expected_dimensions, pconf.label)
        if target.side_of is not None:  # the side table a finalized change left
            row = await store.latest_migration_of(target.name)
        else:
            row = await store.latest_migration(info.oid, target.embedding_column)
    except EmbedfillErrorBase:
        # the live column is gone (a finalized change): its record, by the target's name
        row = await store.latest_migration_of(target.name)
        if row is None or row["phase"] != "finalized":
            raise
    if row is None:
        return MigrationStatus(target=target.name, migration_id=None, phase="none")
    home, to_model = dict(row["home"]), dict(row["to_model"])
    out = MigrationStatus(
        target=target.name,
        migration_id=int(row["id"]),
        phase=str(row["phase"]),
        strategy=str(row["strategy"]),
        from_model=dict(row["from_model"]),
        to_model=to_model,
        home=home,
        gates=dict(row["gates"] or {}),
        job_id=row["job_id"],
        updated_at=row["updated_at"],
    )
    active = await store.active_model(target.name)
    if active is not None and (active["relation"], active["column_name"]) == (
        home["relation"],
        home["column"],
    ):
        out.active = "new"
    if out.phase == "finalized" and out.active == "new":
        out.next_step = _after_finalize(target, out)
    if out.phase == "finalized" or to_model.get("provider") not in config.providers:
        return out
    to = config.providers[to_model["provider"]]
    derived = derived_target(target, to, out.strategy or "table", home)
    try:
        dinfo = await inspect_target(conn, derived, to.expected_dimensions, to.label)
    except EmbedfillErrorBase:
        return out  # its home is not there (yet): nothing covered
    ids = await provenance_ids(
        conn, dinfo, derived.embedding_column, model_identity(to, dinfo), create=False
    )
    dsql = dinfo.sql(derived)
    cur = await conn.execute(dsql.coverage(), {"blank": BLANK, **ids.params()})
    counted = await cur.fetchone()
    rows, missing, stale = (int(v) for v in counted) if counted else (0, 0, 0)
    if dsql.live is not None:  # live rows added since the last mirror: no side row yet
        cur = await conn.execute(homes.unmirrored(dsql), {"blank": BLANK})
        counted = await cur.fetchone()
        unmirrored = int(counted[0]) if counted else 0
        rows, missing = rows + unmirrored, missing + unmirrored
    out.rows, out.missing, out.stale = rows, missing, stale
    out.coverage = 1.0 if rows == 0 else round((rows - missing - stale) / rows, 6)
    states = [
        await homes.index_state(conn, home["schema"], twin["name"])
        for twin in home.get("indexes", [])
    ]
    if states:
        if "invalid" in states:
            out.index = "building" if out.phase == "indexing" else "invalid"
        elif "none" in states:
            out.index = "building" if out.phase == "indexing" else "none"
        else:
            out.index = "valid"
    return out


async def searched_instead(
    conn: psycopg.AsyncConnection[Any], target: TargetConfig, info: TableInfo
) -> ModelIdentity | None:
    """The model of the vectors the app's searches use instead of the target's column,
    while a change of model is cut over and not finalized (``embedfill.active`` names
    its new vectors): the column's vectors are then of the model not searched, and
    ``status`` counts each as outdated_model against this one. None otherwise: before
    the cutover, after a rollback, and once finalized."""
    store = Store(conn)
    try:
        # a savepoint: status reads in one transaction (its snapshot), which a failed
        # statement would abort for every statement after it
        async with conn.transaction():
            row = await store.latest_migration(info.oid, target.embedding_column)
    except psycopg.errors.UndefinedTable:  # a schema from before changes of model
        return None
    if row is None or row["phase"] != "cut_over":
        return None
    home, to = dict(row["home"]), dict(row["to_model"])
    active = await store.active_model(target.name)
    if active is None or (active["relation"], active["column_name"]) != (
        home.get("relation"),
        home.get("column"),
    ):
        return None
    return ModelIdentity(str(to["kind"]), str(to["model"]), int(to["dimensions"]))


def _after_finalize(target: TargetConfig, st: MigrationStatus) -> str | None:
    """After a cutover's finalize dropped the live column, what the config needs, while
    the target still names that column."""
    home = st.home
    if st.strategy == "column":
        if target.embedding_column == home.get("column"):
            return None  # the config already points at the new vectors
        return (
            f"Point target {target.name!r} at its new vectors in the config: "
            f'embedding_column = "{home.get("column")}" and provider = '
            f'"{st.to_model.get("provider")}".'
        )
    if target.embedding_table == home.get("relation"):
        return None  # the config already points at the side table
    return side_table_step(target.name, home, st.to_model.get("provider"))


def side_table_step(target: str, home: dict[str, Any], provider: Any) -> str:
    """What to write in the config once a cutover's finalize left a target's vectors in
    its side table (strategy table)."""
    return (
        f"Point target {target!r} at its side table in the config: "
        f"embedding_table = {json.dumps(home.get('relation'), ensure_ascii=False)} and "
        f"provider = {json.dumps(provider, ensure_ascii=False)}, without embedding_column."
    )


# ---------------------------------------------------------------------- gates

RECALL_MIN = 0.95  # recall@10 of the new index against exact search
RECALL_QUERIES = 20  # sampled stored vectors used as queries


def gate(value: Any, threshold: Any, passed: bool, **more: Any) -> dict[str, Any]:
    return {"value": value, "threshold": threshold, "pass": passed, **more}


def home_id_column(target: TargetConfig, strategy: str) -> str:
    return homes.ROW_ID if strategy == "table" else target.id_column


async def shape_gate(
    conn: psycopg.AsyncConnection[Any], home: dict[str, Any], dimensions: int
) -> dict[str, Any]:
    """Every new vector is of the new size and finite: the home's column type enforces
    the size (``vector(n)``) and pgvector refuses NaN and infinity, so the gate is the
    declared size."""
    declared = await homes.declared_dimensions(
        conn, home["schema"], home["relation"], home["column"]
    )
    return gate(declared, dimensions, declared == dimensions)


async def recall_gate(
    conn: psycopg.AsyncConnection[Any],
    home: dict[str, Any],
    id_column: str,
    vector_type: str,
) -> dict[str, Any]:
    """recall@10 of the new indexes against exact search, for up to RECALL_QUERIES stored
    vectors as queries, at this database's ``hnsw.ef_search`` (``ivfflat.probes`` for an
    IVFFlat index: the app's, unless it sets its own per session). No index: searches
    are exact, nothing to measure. The index itself answers (no sequential scan): on a
    table small enough for the planner to scan, the gate compared exact search with
    itself and read 1.0 at any ef_search, and the index is what the app's searches use
    as the table grows. While an index is missing or INVALID, the gate fails. Every twin
    is measured (only the first was: a second one, on a cast, went unmeasured); the gate
    is the worst of them, ``index`` naming it, and with several ``indexes`` lists each."""
    twins_ = home.get("indexes") or []
    if not twins_:
        return gate(None, RECALL_MIN, True, note="no vector index: searches are exact")
    cur = await conn.execute(
        homes.sample_vectors(home["schema"], home["relation"], home["column"]),
        {"percent": 100.0, "limit": RECALL_QUERIES},
    )
    queries = [r[0] for r in await cur.fetchall()]
    measured = [
        await _twin_recall(conn, home, twin, id_column, vector_type, queries) | {"index": name}
        for twin in twins_
        for name in [twin["name"]]
    ]
    # failing before passing; then unknown (a missing index) before the lowest recall
    worst = min(measured, key=lambda g: (g["pass"], -1.0 if g["value"] is None else g["value"]))
    if len(measured) == 1:
        return worst
    return worst | {"indexes": measured}


async def _twin_recall(
    conn: psycopg.AsyncConnection[Any],
    home: dict[str, Any],
    twin: dict[str, str],
    id_column: str,
    vector_type: str,
    queries: list[str],
) -> dict[str, Any]:
    """One twin's recall gate (recall_gate)."""
    state = await homes.index_state(conn, home["schema"], twin["name"])
    if state != "valid":  # a scan would answer instead, and read exact
        return gate(
            None,
            RECALL_MIN,
            False,
            note=f"the new index {twin['name']} is {'missing' if state == 'none' else state}: "
            "run model start again to build it",
        )
    # a twin of the live type's default class names none (USING ivfflat (col)): its L2
    # class, measured with <-> like any other (it read "not measured" and passed)
    opclass = twin["opclass"] or default_opclass(twin.get("cast") or vector_type)
    operator = homes.distance_operator(opclass)
    if operator is None:
        return gate(None, RECALL_MIN, True, note=f"operator class {twin['opclass']} not measured")
    nearest = homes.nearest(
        home["schema"],
        home["relation"],
        home["column"],
        id_column,
        operator,
        vector_type,
        twin.get("cast", ""),
        int(twin.get("dimensions") or 0),
    )
    # the setting that trades this index's recall for speed, as the app's sessions get it
    setting, default = (
        ("ivfflat.probes", "1") if twin.get("method") == "ivfflat" else ("hnsw.ef_search", "40")
    )
    cur = await conn.execute("SELECT pg_catalog.current_setting(%s, true)", [setting])
    row = await cur.fetchone()
    level = row[0] if row and row[0] else default
    hits = total = 0
    for q in queries:
        # both answers from one snapshot (the fill may be writing); a row of the index's
        # answer counts when it is as near as the exact tenth (rows of one text tie).
        # Each twin's query is the one only it serves: its operator, and through its
        # cast (two twins of one class on one expression: the planner picks one)
        async with conn.transaction():
            await conn.execute(SNAPSHOT)
            await conn.execute("SET LOCAL enable_seqscan = off")
            cur = await conn.execute(nearest, {"q": q})
            approx = [r[1] for r in await cur.fetchall() if r[1] is not None]
            await conn.execute("SET LOCAL enable_seqscan = on")
            await conn.execute("SET LOCAL enable_indexscan = off")
            await conn.execute("SET LOCAL enable_bitmapscan = off")
            # the exact search on one core: parallel workers would take the cores the
            # app's own searches need, for a check that is in no hurry
            await conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
            cur = await conn.execute(nearest, {"q": q})
            exact = [r[1] for r in await cur.fetchall() if r[1] is not None]
        if exact:
            tenth = exact[-1] + 1e-9
            hits += min(len(exact), sum(1 for d in approx if d <= tenth))
            total += len(exact)
    value = 1.0 if total == 0 else round(hits / total, 4)
    knob = {"probes": level} if setting == "ivfflat.probes" else {"ef_search": level}
    return gate(value, RECALL_MIN, value >= RECALL_MIN, queries=len(queries), **knob)


@dataclass(frozen=True)
class ActiveModel:
    """Which vectors a target's searches use (``embedfill.active``): where they are and
    the model that made them, so the app embeds its queries with the same model."""

    target: str
    schema: str
    relation: str
    column: str
    id_column: str  # the row id in ``relation`` (a side table's: embedfill_row_id)
    provider: str  # the provider section of the config
    model: str
    dimensions: int
    since: dt.datetime | None  # the cutover or rollback that chose them; None: never changed
    # what to cast the app's query vector to (``%s::halfvec``): vector or halfvec
    vector_type: str = "vector"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["since"] = self.since.isoformat() if self.since else None
        return out


async def active_of(
    conn: psycopg.AsyncConnection[Any], config: Config, target: TargetConfig
) -> ActiveModel:
    row = await Store(conn).active_model(target.name)
    if row is not None:
        live = row["relation"] == target.table.name
        kind = await homes.vector_kind(
            conn, row["schema_name"], row["relation"], row["column_name"]
        )
        return ActiveModel(
            target=target.name,
            schema=row["schema_name"],
            relation=row["relation"],
            column=row["column_name"],
            id_column=target.id_column if live else homes.ROW_ID,
            provider=row["provider"],
            model=row["model"],
            dimensions=int(row["dimensions"]),
            since=row["since"],
            vector_type=kind or "vector",
        )
    pconf = config.provider_for(target)
    info = await inspect_target(conn, target, pconf.expected_dimensions, pconf.label)
    ident = model_identity(pconf, info)
    return ActiveModel(
        target=target.name,
        schema=info.schema,
        relation=target.table.name,
        column=target.embedding_column,
        id_column=target.id_column,
        provider=pconf.name,
        model=ident.model,
        dimensions=ident.dimensions,
        since=None,
        vector_type=info.types.kind,
    )


async def changes_under_way(
    conn: psycopg.AsyncConnection[Any], config: Config, names: list[str]
) -> tuple[Config, list[str]]:
    """For ``watch``: ``config`` with the derived target of each change of model under way
    on ``names`` (not finalized, its provider section in this config), and their names.
    (A side table's watcher gives it the live table's rows itself: ``homes.mirror``.)"""
    derived_names: list[str] = []
    # only the targets with a change on record are inspected: reading a table's catalog
    # can wait behind an app's lock (a migration), and most targets have none
    under_way = await Store(conn).open_migration_targets()
    for name in names:
        if name not in under_way:
            continue
        live = config.target(name)
        pconf = config.provider_for(live)
        try:
            info = await inspect_target(conn, live, pconf.expected_dimensions, pconf.label)
        except EmbedfillErrorBase:
            continue  # its own watcher reports it
        row = await Store(conn).open_migration(info.oid, live.embedding_column)
        if row is None:
            continue
        if row["to_model"].get("provider") not in config.providers:
            log.warning(
                "a change of %s's model to provider section %r is under way, and the config "
                "this process started with has no [providers.%s]: its new vectors are not "
                "kept fresh by this process; restart it with a --config that has the section "
                "(as the config that started the change has it)",
                name,
                row["to_model"].get("provider"),
                row["to_model"].get("provider"),
            )
            continue
        home = dict(row["home"])
        derived = derived_target(
            live, config.providers[row["to_model"]["provider"]], row["strategy"], home
        )
        config = with_target(config, derived)
        derived_names.append(derived.name)
    return config, derived_names
