"""TOML (or the built-in demo default) -> frozen Config, Provider and Target objects.

Only the edges (CLI, HTTP app factory) call ``load_config``; everything below takes the
objects. Checks that need the database (columns exist, the column is a vector of the
provider's dimension) live in ``db.catalog`` and run before any API call or write.
"""

from __future__ import annotations

import dataclasses
import re
import string
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .concurrency import AUTO_CEILING
from .errors import ConfigError, TargetNotFound
from .kinds import DEFAULT_LOCAL_MODEL, KINDS, MODELS


@dataclass(frozen=True)
class TableName:
    schema: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


@dataclass(frozen=True)
class ProviderConfig:
    # Each field's comment is its meaning in the configuration reference (docs/).
    #: the section's name, ``[providers.NAME]``
    name: str
    #: "openai" (any OpenAI-compatible /v1/embeddings endpoint), "local"
    #: (sentence-transformers on this machine, offline) or "hash" (tests only)
    kind: str
    #: the model's name, as the provider knows it ("text-embedding-3-small")
    model: str
    #: the vector size to ask for; sent to the API only when given
    dimensions: int | None = None
    #: the endpoint ("http://127.0.0.1:8765/v1"); else OPENAI_BASE_URL, else OpenAI's
    base_url: str | None = None
    #: the environment variable (or its _FILE) that holds the platform key
    api_key_env: str = "OPENAI_API_KEY"
    #: inputs per embedding request (at most 2048)
    batch_size: int = 50
    #: requests in flight per worker, or "auto": found by slow start and AIMD, at most 32
    max_concurrency: int = 4
    auto_concurrency: bool = False  # max_concurrency = "auto": found by AIMD
    #: requests per minute per key and model, all workers together; 0: no limit
    rpm: int = 0
    #: tokens per minute per key and model, all workers together; 0: no limit
    tpm: int = 0
    #: deadline of one whole request, its body included (seconds)
    timeout_s: float = 60.0
    #: tries per batch on 429, 5xx, timeouts and malformed answers
    max_attempts: int = 6
    #: the longest single wait before a retry, whatever Retry-After says (seconds)
    max_retry_wait_s: float = 120.0
    #: tokens an input may have; a longer text is truncated (default: the model's limit)
    max_input_tokens: int | None = None
    #: tokens one request may carry in all
    max_request_tokens: int = 300_000
    #: USD per 1M input tokens, for the cost in plans (default: known models' list price)
    price_per_1m_tokens: float | None = None
    #: `embedfill verify`: a stored vector whose cosine similarity with the provider's
    #: fresh vector for the row's text is below this is wrong (0 < x <= 1; remote models
    #: are not bit-exact, so 1.0 would flag vectors that are right)
    verify_min_cosine: float = 0.99

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.model}"

    @property
    def expected_dimensions(self) -> int | None:
        """The vector size this provider will return, when it can be known without a call."""
        if self.dimensions is not None:
            return self.dimensions
        known = MODELS.get(self.model) if KINDS[self.kind].knows_models else None
        return known.dimensions if known else None

    @property
    def input_token_limit(self) -> int:
        if self.max_input_tokens is not None:
            return self.max_input_tokens
        known = MODELS.get(self.model)
        return known.max_input_tokens if known else KINDS[self.kind].max_input_tokens

    @property
    def price(self) -> float:
        """USD per 1M input tokens (0 for local models and unknown models)."""
        if self.price_per_1m_tokens is not None:
            return self.price_per_1m_tokens
        known = MODELS.get(self.model) if KINDS[self.kind].priced else None
        return known.usd_per_1m_tokens if known else 0.0


@dataclass(frozen=True)
class TargetConfig:
    """One table column to fill. Build it with ``parse_config`` (the TOML's shape as a
    dict) or directly; exactly one of ``text`` and ``text_sql`` says what to embed:

    - ``text``: a template over columns, e.g. ``"{title}\\n\\n{body}"``. Each column is
      rendered by the server in its PostgreSQL text form (``::text``): text as is,
      numbers, dates, uuids and booleans as PostgreSQL writes them (``true``), json and
      jsonb as JSON, arrays as array literals; NULL renders as ``""``. Columns with no
      text (bytea, vector, ...) are refused at start-up.
    - ``text_sql``: an SQL expression over the row's columns, evaluated by the server,
      e.g. ``"title || E'\\n\\n' || coalesce(body, '')"``. Trusted configuration, like
      ``tenant_key_sql``; it must give the same text each time it reads the same row.
    """

    # Each field's comment is its meaning in the configuration reference (docs/).
    #: the target's name, for --target and in every report (no "@": it names the new
    #: vectors of a change of model)
    name: str
    #: the table, schema-qualified ("app.SupportTickets"; case kept, quote parts with dots)
    table: TableName
    #: a unique, non-NULL column that names each row
    id_column: str
    #: a template over columns ("{subject}\n\n{body}"; NULL renders as ""); this or text_sql
    text: str | None
    #: the vector (or halfvec) column to fill
    embedding_column: str
    #: the [providers.NAME] section that embeds it
    provider: str
    #: the column whose value is the row's tenant (grouping, per-tenant keys and counts)
    tenant_column: str | None = None
    #: SQL that returns a tenant's own API key, with the placeholder %(tenant)s
    tenant_key_sql: str | None = None
    #: whether a tenant without its own key is embedded with the platform key
    allow_platform_fallback: bool = True
    #: an SQL expression over the row that gives its text; this or text
    text_sql: str | None = None
    #: the side table that holds the vectors, in the table's schema (a change of model's
    #: finalize leaves them there, strategy table): its rows are the table's, by id
    embedding_table: str | None = None
    #: the columns ``text`` reads, in order of first use (computed; empty with text_sql)
    text_columns: tuple[str, ...] = field(init=False, default=())
    # the live target whose rows a side table's rows stand for (``in_side_table``): the
    # text is read from the live row, the side table gets the live table's new rows
    side_of: TargetConfig | None = None

    def __post_init__(self) -> None:
        where = f"target {self.name!r}"
        if self.side_of is not None:  # the text is the live row's (db.target_sql)
            self._no_percent(where)
            return
        has_text, has_sql = bool(self.text), bool(self.text_sql and self.text_sql.strip())
        if has_text and has_sql:
            raise ConfigError(
                f"The {where} sets both text and text_sql; keep one (text is a template "
                "over columns, text_sql an SQL expression over the row)."
            )
        if not has_text and not has_sql:
            raise ConfigError(
                f'The {where} needs text = "{{column}} ..." (a template over columns) or '
                'text_sql = "..." (an SQL expression over the row); see docs/configuration.md.'
            )
        columns = template_columns(self.text, where) if self.text else ()
        object.__setattr__(self, "text_columns", columns)
        self._no_percent(where)

    def _no_percent(self, where: str) -> None:
        """No name may hold ``%``: embedfill's statements run with bound parameters,
        whose placeholders start with ``%`` (psycopg read ``"te%nant"`` as one, and every
        statement on the target failed with a message about placeholders). A side
        target's own names are embedfill's, but for its table (``embedding_table``)."""
        rename = "rename it (a Django model: its db_table or db_column)"
        names: list[tuple[str, str | None, str]] = [("embedding_table", self.table.name, rename)]
        if self.side_of is None:
            names = [
                ("table", self.table.schema, rename),
                ("table", self.table.name, rename),
                ("id_column", self.id_column, rename),
                ("embedding_column", self.embedding_column, rename),
                ("tenant_column", self.tenant_column, rename),
                *(
                    ("text", c, "rename the column, or read it with text_sql")
                    for c in self.text_columns
                ),
            ]
        for key, name, fix in names:
            if name is not None and "%" in name:
                raise ConfigError(
                    f"The {where} names {name!r} in {key}, and embedfill cannot use a name "
                    f"holding '%' in its statements; {fix}."
                )


# A side table's columns (``db.homes``): its rows' ids (the live ids' type, primary key),
# their tenants (as text) and the vectors.
SIDE_ROW_ID = "embedfill_row_id"
SIDE_TENANT = "embedfill_tenant"
SIDE_VECTOR = "embedding"


def in_side_table(live: TargetConfig, relation: str, *, name: str | None = None) -> TargetConfig:
    """The target whose vectors are in the side table ``relation`` (in the live table's
    schema) rather than in a column of the live table: the side table's ids, tenants and
    vectors, the live row's text (``side_of``), the live target's provider and keys."""
    return TargetConfig(
        name=name or live.name,
        table=TableName(live.table.schema, relation),
        id_column=SIDE_ROW_ID,
        text=None,
        embedding_column=SIDE_VECTOR,
        provider=live.provider,
        tenant_column=SIDE_TENANT if live.tenant_column else None,
        tenant_key_sql=live.tenant_key_sql,
        allow_platform_fallback=live.allow_platform_fallback,
        embedding_table=relation,
        side_of=dataclasses.replace(live, embedding_table=None),
    )


@dataclass(frozen=True)
class EngineConfig:
    # Each field's comment is its meaning in the configuration reference (docs/).
    #: connections writing batches in parallel, per process
    write_concurrency: int = 2
    #: embedded batches waiting are merged into writes of this many rows
    write_batch_rows: int = 1000
    #: rows read per keyset page of a scan
    scan_page_size: int = 1000
    #: memory for re-using the vectors of identical texts (MiB)
    dedup_cache_mb: int = 64
    #: a write waits at most this long for a table lock (ms), then is retried
    lock_timeout_ms: int = 2000
    #: a statement runs at most this long (s), then is retried
    statement_timeout_s: int = 120
    #: rows the app holds locked are retried this long at the end of a run (s)
    locked_rows_wait_s: int = 30
    #: a job's rows are cut into chunks of about this many consecutive ids (jobs.py)
    chunk_rows: int = 2000
    #: chunks a worker works on at once (`worker --concurrency`)
    worker_chunks: int = 2
    #: a chunk whose worker has been silent this long (killed, cut off) goes to another
    #: worker (s, at most 60)
    lease_s: int = 30
    #: a watch sends a row that failed for a passing cause again after this long (s),
    #: doubling per failure of the row up to retry_failed_max_s; at once after a key change
    retry_failed_s: int = 60
    #: the longest wait before a failed row is tried again (s)
    retry_failed_max_s: int = 3600
    #: `embedfill model finalize` after a cutover drops the old vectors only once this many
    #: days have passed since it (until then `model rollback` is instant), unless --force
    rollback_window_days: int = 0
    #: `embedfill model verify`'s coverage gate: the share of rows with text that must
    #: hold a new vector of their current text after the final catch-up (a busy app's
    #: edits during it keep 1.0 out of reach for a moment)
    cutover_min_coverage: float = 1.0
    #: parallel maintenance workers for the new vectors' index build (`embedfill model
    #: start`); 0 builds in one process, leaving the database's other cores to the app's
    #: searches (measured on 2 cores: their p99 rose 3x with one worker, not at all
    #: without); raise it on a server with cores to spare (the server's
    #: max_parallel_maintenance_workers still caps it)
    model_index_workers: int = 0


MAX_LEASE_S = 60


def _check_shared_columns(targets: Sequence[TargetConfig]) -> None:
    """Two targets may fill one vector column only if they name its rows by the same id:
    provenance is kept per row id, so each would read the other's as stale (and a
    refresh re-embed every row)."""
    seen: dict[tuple[str, str], TargetConfig] = {}
    for target in targets:
        key = (str(target.table), target.embedding_column)
        other = seen.setdefault(key, target)
        if other is not target and other.id_column != target.id_column:
            raise ConfigError(
                f"Targets {other.name!r} and {target.name!r} both fill {target.table}."
                f"{target.embedding_column} but name its rows by different id columns "
                f"({other.id_column!r}, {target.id_column!r}); give them the same id_column."
            )


@dataclass(frozen=True)
class Config:
    """Providers, targets and engine settings. ``parse_config`` builds one from the
    TOML's shape as a dict; building it directly from the dataclasses works too (each
    target must name one of ``providers``)."""

    providers: Mapping[str, ProviderConfig]
    targets: tuple[TargetConfig, ...]
    engine: EngineConfig = EngineConfig()
    source: str = "built-in demo default"

    def __post_init__(self) -> None:
        _check_shared_columns(self.targets)
        for target in self.targets:
            if target.provider not in self.providers:
                known = ", ".join(sorted(self.providers)) or "none"
                raise ConfigError(
                    f"The target {target.name!r} uses provider {target.provider!r}, which "
                    f"is not defined; defined providers: {known}."
                )

    def target(self, name: str | None) -> TargetConfig:
        if name is None:
            return self.targets[0]
        for target in self.targets:
            if target.name == name:
                return target
        known = ", ".join(t.name for t in self.targets)
        raise TargetNotFound(f"No target named {name!r} is configured; known targets: {known}.")

    def provider_for(self, target: TargetConfig) -> ProviderConfig:
        return self.providers[target.provider]


# --------------------------------------------------------------------------- parsing


def env_secret(env: Mapping[str, str], name: str) -> str:
    """The secret in environment variable ``name``, else the contents of the file that
    ``name_FILE`` names (the convention of official container images: a secret mounted
    as a file), stripped; "" when neither is set. ConfigError when both are set, or
    when the file cannot be read; the message names the variable, never the value."""
    value = (env.get(name) or "").strip()
    path = (env.get(f"{name}_FILE") or "").strip()
    if not path:
        return value
    if value:
        raise ConfigError(f"Both {name} and {name}_FILE are set; unset one of them.")
    try:
        # utf-8-sig: a byte-order mark (Windows editors) is not part of the secret
        found = Path(path).read_text(encoding="utf-8-sig").strip()
    except OSError as exc:
        raise ConfigError(
            f"{name}_FILE names {path}, which cannot be read ({exc.strerror or exc}); "
            "mount the secret there or fix the variable."
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}_FILE names {path}, which is not UTF-8 text.") from None
    if not found:
        raise ConfigError(f"{name}_FILE names {path}, which is empty; put the secret in it.")
    return found


def parse_table_name(value: str) -> TableName:
    """Split ``schema.table`` (either part may be double-quoted, case is kept)."""
    parts: list[str] = []
    buf: list[str] = []
    i, quoted = 0, False
    while i < len(value):
        ch = value[i]
        if quoted:
            if ch == '"':
                if i + 1 < len(value) and value[i + 1] == '"':
                    buf.append('"')
                    i += 1
                else:
                    quoted = False
            else:
                buf.append(ch)
        elif ch == '"':
            quoted = True
        elif ch == ".":
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf))
    if quoted or len(parts) > 2 or any(not p for p in parts):
        raise ConfigError(
            f"Table {value!r} is not a valid name; write it as table or schema.table "
            '(quote a part that contains a dot, e.g. "we.ird".table).'
        )
    return TableName(parts[0], parts[1]) if len(parts) == 2 else TableName(None, parts[0])


def template_columns(template: str, where: str) -> tuple[str, ...]:
    """The column names a text template reads, in order of first use."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(
            f"The text template of {where} is malformed ({exc}); write columns as {{column}} "
            "and literal braces as {{ and }}."
        ) from exc
    columns: list[str] = []
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or spec or conversion or re.search(r"[.\[]", name):
            raise ConfigError(
                f"The text template of {where} uses {{{name}...}}; only plain column "
                "names like {subject} are supported."
            )
        if name not in columns:
            columns.append(name)
    if not columns:
        raise ConfigError(
            f'The text template of {where} names no column; write e.g. text = "{{title}}".'
        )
    return tuple(columns)


def render_text(template: str, values: Mapping[str, object]) -> str:
    """Fill a template; NULL renders as an empty string."""
    return template.format_map({k: "" if v is None else v for k, v in values.items()})


def text_renderer(
    template: str | None, columns: tuple[str, ...]
) -> Callable[[Sequence[object]], str]:
    """A function from the values the scan selects (``columns``' text forms, in order)
    to the text; a template that is a single column, or no template (``text_sql``: the
    server's one value), is just that value."""
    if template is None or (len(columns) == 1 and template == "{" + columns[0] + "}"):
        return lambda values: "" if values[0] is None else str(values[0])
    return lambda values: render_text(template, dict(zip(columns, values, strict=True)))


_PROVIDER_KEYS = {
    "kind": str,
    "model": str,
    "dimensions": int,
    "base_url": str,
    "api_key_env": str,
    "batch_size": int,
    "max_concurrency": (int, str),
    "rpm": int,
    "tpm": int,
    "timeout_s": (int, float),
    "max_attempts": int,
    "max_retry_wait_s": (int, float),
    "max_input_tokens": int,
    "max_request_tokens": int,
    "price_per_1m_tokens": (int, float),
    "verify_min_cosine": (int, float),
}
_TARGET_KEYS = {
    "name": str,
    "table": str,
    "id_column": str,
    "text": str,
    "text_sql": str,
    "embedding_column": str,
    "embedding_table": str,
    "tenant_column": str,
    "provider": str,
    "tenant_key_sql": str,
    "allow_platform_fallback": bool,
}
_ENGINE_KEYS = {
    "write_concurrency": int,
    "write_batch_rows": int,
    "scan_page_size": int,
    "dedup_cache_mb": int,
    "lock_timeout_ms": int,
    "statement_timeout_s": int,
    "locked_rows_wait_s": int,
    "chunk_rows": int,
    "worker_chunks": int,
    "lease_s": int,
    "retry_failed_s": int,
    "retry_failed_max_s": int,
    "rollback_window_days": int,
    "cutover_min_coverage": (int, float),
    "model_index_workers": int,
}
_TOP_KEYS = ("providers", "targets", "engine")


def _check_keys(data: Mapping[str, Any], allowed: Mapping[str, Any], where: str) -> None:
    for key, value in data.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise ConfigError(f"Unknown key {key!r} in {where}; known keys are: {known}.")
        expected = allowed[key]
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if isinstance(expected, tuple) and isinstance(value, bool):
            ok = False
        if not ok:
            kind = expected.__name__ if isinstance(expected, type) else "number"
            raise ConfigError(f"Key {key!r} in {where} must be a {kind}, not {value!r}.")


def _positive(value: int, key: str, where: str, *, allow_zero: bool = False) -> int:
    if value < 0 or (value == 0 and not allow_zero):
        floor = "0 or more" if allow_zero else "at least 1"
        raise ConfigError(f"Key {key!r} in {where} must be {floor}, not {value}.")
    return value


def _parse_provider(name: str, data: Mapping[str, Any]) -> ProviderConfig:
    where = f"[providers.{name}]"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a table of settings.")
    _check_keys(data, _PROVIDER_KEYS, where)
    kind = data.get("kind")
    spec = KINDS.get(kind) if isinstance(kind, str) else None  # kinds.py: each kind
    if spec is None:
        raise ConfigError(
            f"{where} needs kind = one of {', '.join(map(repr, KINDS))}, not {kind!r}."
        )
    kind = spec.name
    model = data.get("model", spec.default_model)
    if not model:
        raise ConfigError(f'{where} needs a model, e.g. model = "text-embedding-3-small".')
    if spec.needs_dimensions and "dimensions" not in data:
        raise ConfigError(f"{where} of kind {kind!r} needs dimensions = N.")
    batch_size = _positive(data.get("batch_size", 50), "batch_size", where)
    if batch_size > 2048:
        raise ConfigError(f"Key 'batch_size' in {where} must be at most 2048, not {batch_size}.")
    # "auto" (concurrency.py) unless set: an API's right level depends on its
    # latency and limits, which the run measures; a local model already uses every core
    concurrency = data.get("max_concurrency", spec.concurrency)
    auto = concurrency == "auto"
    if isinstance(concurrency, str) and not auto:
        raise ConfigError(
            f"Key 'max_concurrency' in {where} must be a number or \"auto\", not {concurrency!r}."
        )
    for key in (
        "dimensions",
        "max_attempts",
        "max_input_tokens",
        "max_request_tokens",
    ):
        if key in data:
            _positive(data[key], key, where)
    if not auto:
        _positive(concurrency, "max_concurrency", where)
    for key in ("rpm", "tpm"):
        _positive(data.get(key, 0), key, where, allow_zero=True)
    timeout = float(data.get("timeout_s", 60.0))
    if timeout <= 0:
        raise ConfigError(f"Key 'timeout_s' in {where} must be more than 0.")
    max_wait = float(data.get("max_retry_wait_s", 120.0))
    if max_wait <= 0:
        raise ConfigError(f"Key 'max_retry_wait_s' in {where} must be more than 0.")
    price = data.get("price_per_1m_tokens")
    if price is not None and price < 0:
        raise ConfigError(f"Key 'price_per_1m_tokens' in {where} must be 0 or more.")
    min_cosine = float(data.get("verify_min_cosine", 0.99))
    if not 0 < min_cosine <= 1:
        raise ConfigError(
            f"Key 'verify_min_cosine' in {where} must be more than 0 and at most 1, "
            f"not {min_cosine:g}."
        )
    return ProviderConfig(
        name=name,
        kind=kind,
        model=model,
        dimensions=data.get("dimensions"),
        base_url=data.get("base_url"),
        api_key_env=data.get("api_key_env", "OPENAI_API_KEY"),
        batch_size=batch_size,
        # a local model already uses every core; more calls at once only contend
        max_concurrency=AUTO_CEILING if auto else concurrency,
        auto_concurrency=auto,
        rpm=data.get("rpm", 0),
        tpm=data.get("tpm", 0),
        timeout_s=timeout,
        max_attempts=data.get("max_attempts", 6),
        max_retry_wait_s=max_wait,
        max_input_tokens=data.get("max_input_tokens"),
        max_request_tokens=data.get("max_request_tokens", 300_000),
        price_per_1m_tokens=None if price is None else float(price),
        verify_min_cosine=min_cosine,
    )


def parse_provider(name: str, data: Mapping[str, Any]) -> ProviderConfig:
    """One ``[providers.NAME]`` table (a dict) -> ProviderConfig; ConfigError if wrong."""
    return _parse_provider(name, data)


def _parse_target(
    index: int, data: Mapping[str, Any], providers: Mapping[str, Any]
) -> TargetConfig:
    where = f"[[targets]] #{index + 1}"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a table of settings.")
    if isinstance(data.get("name"), str):
        where = f"target {data['name']!r}"
    _check_keys(data, _TARGET_KEYS, where)
    side = data.get("embedding_table")
    for key in ("name", "table", "id_column", "embedding_column", "provider"):
        if key == "embedding_column" and side:
            continue  # the side table's, "embedding"
        if not data.get(key):
            raise ConfigError(f"The {where} needs {key} = ...; see docs/configuration.md.")
    if "@" in str(data["name"]):
        raise ConfigError(
            f"The {where} has '@' in its name, which embedfill keeps for the new vectors of "
            "a change of model (target@provider); rename the target."
        )
    if data["provider"] not in providers:
        known = ", ".join(sorted(providers)) or "none"
        raise ConfigError(
            f"The {where} uses provider {data['provider']!r}, which is not defined; "
            f"defined providers: {known}."
        )
    if data.get("tenant_key_sql") and not data.get("tenant_column"):
        raise ConfigError(f"The {where} sets tenant_key_sql but no tenant_column to group by.")
    tenant_sql = data.get("tenant_key_sql")
    if tenant_sql is not None and "%(tenant)s" not in tenant_sql:
        raise ConfigError(
            f"The tenant_key_sql of {where} must use the placeholder %(tenant)s for the tenant id."
        )
    target = TargetConfig(
        name=data["name"],
        table=parse_table_name(data["table"]),
        id_column=data["id_column"],
        text=data.get("text"),
        embedding_column=data.get("embedding_column") or SIDE_VECTOR,
        provider=data["provider"],
        tenant_column=data.get("tenant_column"),
        tenant_key_sql=tenant_sql,
        allow_platform_fallback=data.get("allow_platform_fallback", True),
        text_sql=data.get("text_sql"),
    )
    if not side:
        return target
    schema = target.table.schema
    if schema is not None and side.startswith(f"{schema}."):  # qualified, as status shows it
        side = side[len(schema) + 1 :]  # (a name with a dot of its own is taken whole)
    if data.get("embedding_column", SIDE_VECTOR) != SIDE_VECTOR:
        raise ConfigError(
            f"The {where} keeps its vectors in embedding_table {side!r}, whose vector column "
            f'is "{SIDE_VECTOR}"; remove embedding_column (it named the live table\'s).'
        )
    return in_side_table(target, side)


def parse_config(data: Mapping[str, Any], source: str = "<memory>") -> Config:
    """Build a Config from already-parsed TOML data."""
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(
                f"Unknown top-level key {key!r} in {source}; known keys are: "
                f"{', '.join(_TOP_KEYS)}."
            )
    raw_providers = data.get("providers", {})
    if not isinstance(raw_providers, Mapping) or not raw_providers:
        raise ConfigError(f"{source} defines no [providers.NAME] table.")
    providers = {name: _parse_provider(name, p) for name, p in raw_providers.items()}
    raw_targets = data.get("targets", [])
    if not isinstance(raw_targets, list) or not raw_targets:
        raise ConfigError(f"{source} defines no [[targets]] table.")
    targets = tuple(_parse_target(i, t, providers) for i, t in enumerate(raw_targets))
    names = [t.name for t in targets]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"Two targets in {source} are named {duplicate!r}; names must be unique.")
    raw_engine = data.get("engine", {})
    if not isinstance(raw_engine, Mapping):
        raise ConfigError("[engine] must be a table of settings.")
    _check_keys(raw_engine, _ENGINE_KEYS, "[engine]")
    for key, value in raw_engine.items():
        _positive(
            value,
            key,
            "[engine]",
            allow_zero=key in ("locked_rows_wait_s", "rollback_window_days", "model_index_workers"),
        )
    if not 0 < raw_engine.get("cutover_min_coverage", 1.0) <= 1:
        raise ConfigError(
            "[engine] cutover_min_coverage is a share of rows: more than 0, at most 1 "
            f"(not {raw_engine['cutover_min_coverage']})."
        )
    if raw_engine.get("lease_s", 0) > MAX_LEASE_S:
        raise ConfigError(
            f"[engine] lease_s is {raw_engine['lease_s']}, more than {MAX_LEASE_S}: a killed "
            f"worker's chunks would wait that long for another worker; use at most {MAX_LEASE_S}."
        )
    engine = EngineConfig(**raw_engine)
    if "cutover_min_coverage" in raw_engine:  # 1 in TOML is an int
        engine = dataclasses.replace(
            engine, cutover_min_coverage=float(raw_engine["cutover_min_coverage"])
        )
    return Config(providers=providers, targets=targets, engine=engine, source=source)


def load_config(path: str | Path | None) -> Config:
    """Read a TOML config file, or return the built-in demo default when ``path`` is None."""
    if path is None:
        return default_config()
    return parse_config(read_toml(Path(path)), source=str(path))


def read_toml(p: Path, fix: str = "pass an existing --config PATH") -> dict[str, Any]:
    """A TOML config file's data; ConfigError naming the file (and ``fix`` when it does
    not exist)."""
    try:
        raw = p.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file {p} does not exist; {fix}.") from exc
    except OSError as exc:
        raise ConfigError(f"Config file {p} cannot be read ({exc.strerror}).") from exc
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Config file {p} is not valid TOML: {exc}.") from exc


DEMO_DIMENSIONS = 384


def default_config() -> Config:
    """The demo target: ``workflow_insights`` embedded by the bundled local model."""
    return parse_config(
        {
            "providers": {"local": {"kind": "local", "model": DEFAULT_LOCAL_MODEL}},
            "targets": [
                {
                    "name": "workflow_insights",
                    "table": "public.workflow_insights",
                    "id_column": "id",
                    "text": "{title}\n\n{content}",
                    "embedding_column": "embedding",
                    "tenant_column": "tenant_id",
                    "provider": "local",
                }
            ],
        },
        source="built-in demo default",
    )
