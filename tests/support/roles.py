"""Real PostgreSQL roles for tests, and DATABASE_URLs written the way apps write them."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from urllib.parse import quote

import psycopg
from psycopg import conninfo, sql

_counter = itertools.count()

# What a least-privileged application role needs, as the README says (once embedfill's
# schema exists): USAGE on the schema, DML on its tables, USAGE on its sequences.
EMBEDFILL_GRANTS = (
    "GRANT USAGE ON SCHEMA embedfill TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA embedfill TO {role}",
    "GRANT USAGE ON ALL SEQUENCES IN SCHEMA embedfill TO {role}",
    # the job queue's rows are deleted when done (procrastinate's tables)
    "GRANT DELETE ON embedfill.procrastinate_jobs, embedfill.procrastinate_workers,"
    " embedfill.procrastinate_events, embedfill.procrastinate_periodic_defers TO {role}",
    # `watch` drains the queue the change triggers fill
    "GRANT DELETE ON embedfill.changes TO {role}",
)
TICKETS_GRANTS = (
    "GRANT USAGE ON SCHEMA app TO {role}",
    'GRANT SELECT, UPDATE ON app."SupportTickets" TO {role}',
)


def url_for(
    dsn: str,
    *,
    user: str | None = None,
    password: str | None = None,
    scheme: str = "postgresql",
    query: str = "",
) -> str:
    """``dsn`` (any libpq form) rewritten as a URL, with another user/password and a raw
    query string appended (``query`` is written as given, e.g. ``schema=app&x=1``)."""
    info = conninfo.conninfo_to_dict(dsn)
    user = user or str(info.get("user") or "")
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    host = str(info.get("host") or "")
    params = []
    if host.startswith("/"):
        params.append("host=" + quote(host, safe=""))
        host = ""
    port = info.get("port")
    netloc = f"{auth}@{host}" + (f":{port}" if port and host else "")
    if port and not host:
        params.append(f"port={port}")
    if query:
        params.append(query)
    tail = "?" + "&".join(params) if params else ""
    return f"{scheme}://{netloc}/{quote(str(info['dbname']), safe='')}{tail}"


@dataclass
class Roles:
    """Creates LOGIN roles on the test server; drops them (and what they own or were
    granted in ``db_url``) at the end of the test."""

    db_url: str
    created: list[str] = field(default_factory=list)

    def create(self, *, connection_limit: int | None = None, password: str = "pw") -> str:
        name = f"ef_role_{os.getpid()}_{next(_counter)}"
        stmt = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(name), sql.Literal(password)
        )
        if connection_limit is not None:
            stmt += sql.SQL(" CONNECTION LIMIT {}").format(sql.Literal(connection_limit))
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute(stmt)
        self.created.append(name)
        return name

    def grant(self, role: str, *statements: str) -> None:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            for stmt in statements:
                conn.execute(stmt.format(role=sql.Identifier(role).as_string(conn)))

    def url(self, role: str, password: str = "pw", **kw: str) -> str:
        return url_for(self.db_url, user=role, password=password, **kw)

    def drop_all(self) -> None:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            for name in self.created:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (name,),
                )
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
