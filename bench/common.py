"""Shared pieces of the benchmarks: databases, realistic texts, tables, measurements."""

from __future__ import annotations

import os
import random
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import conninfo, sql

from embedfill.seed import TENANTS, insight

TABLE = "docs"


def fresh_database(server_url: str, name: str) -> str:
    """Drop and create database ``name`` with pgvector; returns its URL."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = conninfo.make_conninfo(server_url, dbname=name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
    return url


def bench_text(rng: random.Random) -> str:
    """A realistic 300-600 character text: one or more workflow insights."""
    parts: list[str] = []
    while sum(map(len, parts)) < 300:
        _, title, content = insight(rng)
        parts.append(f"{title}. {content}")
    return " ".join(parts)[:600]


def texts(
    n: int, *, seed: int = 7, dup_fraction: float = 0.0, tenants: int = 5
) -> Iterator[tuple[str, str]]:
    """(tenant, text) pairs; ``dup_fraction`` of rows repeat an earlier text of their tenant."""
    rng = random.Random(seed)
    earlier: dict[str, list[str]] = {}
    for i in range(n):
        tenant = TENANTS[i % tenants][0]
        pool = earlier.setdefault(tenant, [])
        if pool and rng.random() < dup_fraction:
            yield tenant, rng.choice(pool)
            continue
        text = bench_text(rng)
        if len(pool) < 5000:
            pool.append(text)
        yield tenant, text


def make_table(
    url: str, rows: int, dims: int, *, hnsw: bool = False, dup_fraction: float = 0.0
) -> None:
    """``docs(id, tenant, body, embedding vector(dims))`` with every embedding NULL."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigint PRIMARY KEY, tenant text NOT NULL, body text NOT NULL,"
                " embedding vector({}))"
            ).format(sql.Identifier(TABLE), sql.Literal(dims))
        )
        with conn.cursor().copy(
            sql.SQL("COPY {} (id, tenant, body) FROM STDIN").format(sql.Identifier(TABLE))
        ) as copy:
            for i, (tenant, text) in enumerate(texts(rows, dup_fraction=dup_fraction), 1):
                copy.write_row((i, tenant, text))
        if hnsw:
            conn.execute(
                sql.SQL("CREATE INDEX {} ON {} USING hnsw (embedding vector_cosine_ops)").format(
                    sql.Identifier(f"{TABLE}_hnsw"), sql.Identifier(TABLE)
                )
            )
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(TABLE)))


def missing(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE embedding IS NULL").format(sql.Identifier(TABLE))
        ).fetchone()
    assert row is not None
    return int(row[0])


def target_config(
    provider: dict[str, Any],
    engine: dict[str, Any] | None = None,
    others: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """The ``docs`` target with ``provider`` (section ``p``), and ``others`` sections."""
    from embedfill.config import parse_config

    return parse_config(
        {
            "providers": {"p": provider, **(others or {})},
            "targets": [
                {
                    "name": "docs",
                    "table": TABLE,
                    "id_column": "id",
                    "text": "{body}",
                    "embedding_column": "embedding",
                    "tenant_column": "tenant",
                    "provider": "p",
                }
            ],
            **({"engine": engine} if engine else {}),
        }
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Timer:
    seconds: float = 0.0


@contextmanager
def timed() -> Iterator[Timer]:
    t = Timer()
    start = time.perf_counter()
    try:
        yield t
    finally:
        t.seconds = time.perf_counter() - start


def unit_vectors(n: int, dims: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, dims)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return list(m)


@dataclass
class CpuUsed:
    """CPU seconds this process and the PostgreSQL server spent during a measurement."""

    worker_s: float = 0.0
    postgres_s: float | None = None  # None: the server is not on this machine

    def per_1000(self, rows: int) -> dict[str, float | None]:
        per = 1000 / rows if rows else 0.0
        return {
            "worker_cpu_s_per_1000": round(self.worker_s * per, 4),
            "postgres_cpu_s_per_1000": (
                None if self.postgres_s is None else round(self.postgres_s * per, 4)
            ),
        }


def _postgres_cpu_s(postmaster: int) -> float | None:
    """The server's CPU seconds so far: the postmaster's own, its live children's, and
    (cutime, cstime) what the children that have exited spent (closed connections)."""
    tick = os.sysconf("SC_CLK_TCK")

    def fields(pid: int | str) -> list[str]:
        text = Path(f"/proc/{pid}/stat").read_text()
        return text[text.rindex(")") + 2 :].split()

    try:
        own = fields(postmaster)
        total = sum(int(x) for x in own[11:15])  # utime stime cutime cstime
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        try:
            f = fields(child)
        except OSError:
            continue  # exited meanwhile: counted in cutime/cstime from now on
        total += int(f[11]) + int(f[12])
    return total / tick


@contextmanager
def cpu(url: str) -> Iterator[CpuUsed]:
    """Measure the CPU this process and a local PostgreSQL (found from a backend's
    parent) use inside the block."""
    postmaster: int | None = None
    with psycopg.connect(url) as conn:  # read the backend's parent while it still runs
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        if row is not None:
            try:
                stat = Path(f"/proc/{row[0]}/stat").read_text()
                postmaster = int(stat[stat.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError):
                postmaster = None
    used = CpuUsed()
    mine = resource.getrusage(resource.RUSAGE_SELF)
    server = _postgres_cpu_s(postmaster) if postmaster else None
    try:
        yield used
    finally:
        after = resource.getrusage(resource.RUSAGE_SELF)
        used.worker_s = (after.ru_utime - mine.ru_utime) + (after.ru_stime - mine.ru_stime)
        if server is not None and postmaster is not None:
            now = _postgres_cpu_s(postmaster)
            used.postgres_s = None if now is None else now - server
