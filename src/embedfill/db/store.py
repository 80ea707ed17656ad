"""embedfill's own tables: runs, failures, tenant keys. The only caller of ``queries``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from ..models import Failure, Report, Retry
from . import homes
from . import queries as q


def watch_key(oid: int, column: str) -> str:
    """The session advisory lock's key that its leading watcher holds on a column."""
    return q.WATCH_KEY.format(oid=oid, column=column)


@dataclass(frozen=True)
class KeyInfo:
    tenant: str
    key_hint: str
    updated_at: dt.datetime


class Store:
    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    # ---------------------------------------------------------------- locks

    async def try_lock(self, key: str) -> bool:
        cur = await self.conn.execute(q.TRY_TARGET_LOCK, {"key": key})
        row = await cur.fetchone()
        return bool(row and row[0])

    async def unlock(self, key: str) -> None:
        await self.conn.execute(q.RELEASE_TARGET_LOCK, {"key": key})

    # ---------------------------------------------------------------- provenance

    async def has_provenance(self) -> bool:
        """Whether embedfill's schema has its provenance table (a read-only check)."""
        cur = await self.conn.execute(q.PROVENANCE_EXISTS)
        row = await cur.fetchone()
        return bool(row and row[0])

    async def vector_column_id(self, oid: int, column: str, *, create: bool) -> int | None:
        """The number of a vector column in provenance; None when never recorded (and not
        ``create``)."""
        if create:
            await self.conn.execute(q.ENSURE_VECTOR_COLUMN, {"oid": oid, "column": column})
        cur = await self.conn.execute(q.VECTOR_COLUMN_ID, {"oid": oid, "column": column})
        row = await cur.fetchone()
        return int(row[0]) if row else None

    async def model_id(
        self, provider: str, model: str, dimensions: int, *, create: bool
    ) -> int | None:
        params = {"provider": provider, "model": model, "dimensions": dimensions}
        if create:
            await self.conn.execute(q.ENSURE_MODEL, params)
        cur = await self.conn.execute(q.MODEL_ID, params)
        row = await cur.fetchone()
        return int(row[0]) if row else None

    # ---------------------------------------------------------------- runs

    async def create_run(
        self,
        *,
        target: str,
        actor: str,
        parameters: dict[str, Any],
        dry_run: bool,
        status: str = "running",
        missing_before: int | None = None,
        table_oid: int | None = None,
        column: str | None = None,
        kind: str | None = None,
        spec: dict[str, Any] | None = None,
    ) -> int:
        cur = await self.conn.execute(
            q.INSERT_RUN,
            {
                "kind": kind,
                "spec": None if spec is None else Jsonb(spec),
                "target": target,
                "actor": actor,
                "parameters": Jsonb(parameters),
                "dry_run": dry_run,
                "status": status,
                "missing_before": missing_before,
                "table_oid": table_oid,
                "column": column,
            },
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def set_parameters(self, run_id: int, parameters: dict[str, Any]) -> None:
        await self.conn.execute(
            q.SET_RUN_PARAMETERS, {"id": run_id, "parameters": Jsonb(parameters)}
        )

    async def dead_runs(
        self, table_oid: int, column: str, own: int
    ) -> list[tuple[int, dict[str, Any]]]:
        """Runs of this table column still shown running, other than ``own`` (call while
        holding the column's lock: their processes are gone). Ids and parameters."""
        cur = await self.conn.execute(
            q.DEAD_RUNS, {"table_oid": table_oid, "column": column, "own": own}
        )
        return [(int(r[0]), r[1]) for r in await cur.fetchall()]

    async def abandon_run(self, run_id: int) -> None:
        await self.conn.execute(q.ABANDON_RUN, {"id": run_id})

    async def get_run(self, run_id: int) -> dict[str, Any] | None:
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(q.GET_RUN, {"id": run_id})
            return await cur.fetchone()

    async def list_runs(self, target: str | None, limit: int) -> list[dict[str, Any]]:
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(q.LIST_RUNS, {"target": target, "limit": limit})
            return await cur.fetchall()

    async def running_jobs(self) -> list[tuple[str, float, float, int, int]]:
        """Per target with a job not over: (target, oldest's age s, most silent's s, rows
        done, chunks queued or in a worker's hands)."""
        cur = await self.conn.execute(q.RUNNING_JOBS)
        return [(r[0], r[1], r[2], r[3], r[4]) for r in await cur.fetchall()]

    async def workers_alive(self) -> int:
        """Worker processes connected to this database now (their control connection's
        lock; procrastinate's own tables are not read)."""
        cur = await self.conn.execute(q.WORKERS_ALIVE)
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    def _counts(self, report: Report) -> dict[str, Any]:
        return {
            "id": report.run_id,
            "status": report.status,
            "missing_before": report.missing_before,
            "embedded": report.embedded,
            "skipped": report.skipped,
            "failed": report.failed,
            "requests": report.requests,
            "tokens": report.tokens,
        }

    async def save_progress(self, report: Report) -> bool:
        """Record progress; True when someone asked this run to stop."""
        cur = await self.conn.execute(
            q.UPDATE_RUN_PROGRESS, self._counts(report) | {"progress": Jsonb(report.progress())}
        )
        row = await cur.fetchone()
        return bool(row and row[0])

    async def request_cancel(self, run_id: int) -> bool:
        cur = await self.conn.execute(q.REQUEST_CANCEL, {"id": run_id})
        return await cur.fetchone() is not None

    async def finish_run(self, report: Report, error: str | None = None) -> None:
        await self.conn.execute(
            q.FINISH_RUN,
            self._counts(report)
            | {
                "estimated_cost_usd": round(report.estimated_cost_usd, 6),
                "report": Jsonb(report.to_dict()),
                "error": error,
                "progress": Jsonb(report.progress()),
            },
        )

    async def record_failures(
        self,
        run_id: int,
        failures: Iterable[tuple[Failure, Retry]],
        *,
        retry_s: float = 60.0,
        retry_max_s: float = 3600.0,
    ) -> None:
        """The failures of a job's rows, each with when a watch may send it again."""
        params = [
            {
                "run_id": run_id,
                "row_id": str(f.id),
                "tenant": f.tenant,
                "error_class": f.error_class,
                "message": f.error,
                "attempts": f.attempts,
                "text_md5": retry.text_md5,
                "key_digest": retry.key_digest,
                "rejected_input": retry.rejected_input,
                "base_s": retry_s,
                "max_s": retry_max_s,
            }
            for f, retry in failures
        ]
        if params:
            async with self.conn.cursor() as cur:
                await cur.executemany(q.INSERT_FAILURE, params)

    async def failing(
        self, table_oid: int, column: str, query: sql.Composed
    ) -> list[tuple[str | None, str, int]]:
        """(tenant, error class, rows) of the column's rows failing now (``query``: the
        target's ``TargetSQL.failing``; call it once the schema has provenance)."""
        cur = await self.conn.execute(query, {"rel": table_oid, "column": column})
        return [(r[0], str(r[1]), int(r[2])) for r in await cur.fetchall()]

    async def watch_progress(self, run_id: int) -> dict[str, int]:
        """A watch job's rows queued, in flight and done in the last hour."""
        cur = await self.conn.execute(q.WATCH_PROGRESS, {"run_id": run_id})
        row = await cur.fetchone()
        queued, in_flight, done = row if row is not None else (0, 0, 0)
        return {"queued": int(queued), "in_flight": int(in_flight), "done_last_hour": int(done)}

    async def retry_tenant_now(self, tenant: str | None, run_id: int | None = None) -> list[str]:
        """The tenant's key changed: its failed rows waiting for a retry go at once (in
        one job, or every job when ``run_id`` is None); their keys."""
        cur = await self.conn.execute(q.RETRY_TENANT_NOW, {"tenant": tenant, "run_id": run_id})
        return [str(r[0]) for r in await cur.fetchall()]

    async def failures_came_due(self, run_id: int, since: Any) -> tuple[bool, Any]:
        """Whether failed rows of the job came due for a retry since ``since`` (a server
        timestamp; None: any due), and the server's now, for the next call."""
        cur = await self.conn.execute(q.FAILURES_CAME_DUE, {"run_id": run_id, "since": since})
        row = await cur.fetchone()
        assert row is not None
        return bool(row[0]), row[1]

    async def key_failures(
        self, run_id: int, classes: Sequence[str]
    ) -> list[tuple[str | None, str | None]]:
        """(tenant, digest of the key tried) of the tenants whose rows wait for a retry
        after one of these key failures."""
        cur = await self.conn.execute(q.KEY_FAILURES, {"run_id": run_id, "classes": list(classes)})
        return [(r[0], r[1]) for r in await cur.fetchall()]

    # ---------------------------------------------------------------- jobs

    async def lock_for_create(self, key: str) -> None:
        """Inside a transaction: one job creation per table column at a time."""
        await self.conn.execute(q.JOB_CREATE_LOCK, {"key": key})

    async def finishable_jobs(self) -> list[dict[str, Any]]:
        """Running jobs with chunks, none of them open: to finish (what a spec is read
        from)."""
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(q.FINISHABLE_JOBS)
            return await cur.fetchall()

    async def adopt_spec(self, run_id: int, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
        """A job from before specs takes the spec of the first worker that works on it;
        the job's row as it then is (another worker may have been first)."""
        await self.conn.execute(q.ADOPT_SPEC, {"id": run_id, "kind": kind, "spec": Jsonb(spec)})
        state = await self.run_state(run_id)
        assert state is not None
        return state

    async def running_jobs_of(self, targets: list[str]) -> list[dict[str, Any]]:
        """Jobs running for these target names: id, target, kind, spec and the rest a
        spec is read from."""
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(q.RUNNING_JOBS_OF, {"targets": targets})
            return await cur.fetchall()

    async def active_job(self, table_oid: int, column: str) -> dict[str, Any] | None:
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(q.ACTIVE_JOB, {"table_oid": table_oid, "column": column})
            return await cur.fetchone()

    async def add_chunks(self, run_id: int, bounds: list[tuple[Any, Any]]) -> list[int]:
        """The job's chunks, marked rung (the caller rings them in the same
        transaction); their numbers."""
        await self.conn.execute(
            q.INSERT_CHUNKS,
            {
                "run_id": run_id,
                "seqs": list(range(1, len(bounds) + 1)),
                "los": [Jsonb(lo) for lo, _ in bounds],
                "his": [Jsonb(hi) for _, hi in bounds],
            },
        )
        return list(range(1, len(bounds) + 1))

    async def claim_chunk(
        self, run_id: int, seq: int, worker: str, lease_s: float
    ) -> tuple[Any, Any, int, list[str] | None, bool] | None:
        """(lo, hi, attempt, keys, more): a range, or a watch chunk's ids (keys), and
        whether other chunks of the job were still to do; None when the chunk is over
        or a live worker holds it."""
        cur = await self.conn.execute(
            q.CLAIM_CHUNK, {"run_id": run_id, "seq": seq, "worker": worker, "lease_s": lease_s}
        )
        row = await cur.fetchone()
        return None if row is None else (row[0], row[1], int(row[2]), row[3], bool(row[4]))

    async def add_key_chunks(self, run_id: int, keys: list[list[str]]) -> list[int]:
        """Chunks of ids for a running (watch) job, marked rung (the caller rings them in
        the same transaction); their numbers."""
        cur = await self.conn.execute(q.NEXT_CHUNK_SEQ, {"run_id": run_id})
        row = await cur.fetchone()
        assert row is not None
        first = int(row[0])
        await self.conn.execute(
            q.INSERT_KEY_CHUNKS,
            {"run_id": run_id, "first": first, "keys": [Jsonb(k) for k in keys]},
        )
        return list(range(first, first + len(keys)))

    async def open_chunk_keys(self, run_id: int) -> set[str]:
        cur = await self.conn.execute(q.OPEN_CHUNK_KEYS, {"run_id": run_id})
        return {r[0] for r in await cur.fetchall()}

    async def drain_changes(self, column_id: int, inflight: set[str], limit: int) -> list[str]:
        cur = await self.conn.execute(
            q.DRAIN_CHANGES,
            {"column_id": column_id, "inflight": sorted(inflight), "limit": limit},
        )
        return [r[0] for r in await cur.fetchall()]

    async def fan_out_changes(self, table_oid: int, column: str, keys: list[str]) -> None:
        """Queue ``keys``, drained for the live column, for the new vectors of a change
        of model under way on it too (q.FAN_OUT_CHANGES)."""
        await self.conn.execute(
            q.FAN_OUT_CHANGES,
            {
                "table_oid": table_oid,
                "column": column,
                "keys": keys,
                "side_vector": homes.VECTOR,
            },
        )

    async def hold_changes_of_model(self, table_oid: int, column: str) -> None:
        """In a drain's transaction, before its queue rows: hold the change of model under
        way on the column, if any (q.HOLD_CHANGES_OF_MODEL)."""
        await self.conn.execute(q.HOLD_CHANGES_OF_MODEL, {"table_oid": table_oid, "column": column})

    async def move_changes(self, dropped: tuple[str, str, str], kept: tuple[str, str, str]) -> None:
        """Queue what is queued for the ``dropped`` (schema, table, column) for ``kept``."""
        await self.conn.execute(
            q.MOVE_CHANGES,
            {
                "schema": dropped[0],
                "table": dropped[1],
                "column": dropped[2],
                "to_schema": kept[0],
                "to_table": kept[1],
                "to_column": kept[2],
            },
        )

    async def forget_changes(self, schema: str, table: str, column: str) -> None:
        """Drop what is queued for a vector column that no longer exists (finalize)."""
        await self.conn.execute(
            q.FORGET_CHANGES, {"schema": schema, "table": table, "column": column}
        )

    async def try_watch_lock(self, key: str) -> bool:
        cur = await self.conn.execute(q.WATCH_LOCK, {"key": key})
        row = await cur.fetchone()
        return bool(row and row[0])

    async def watch_held(self, key: str) -> bool:
        """Whether a watcher (of any process) holds the column's watch lock now."""
        cur = await self.conn.execute(q.WATCH_HELD, {"key": key})
        row = await cur.fetchone()
        return bool(row and row[0])

    async def release_watch_lock(self, key: str) -> None:
        await self.conn.execute(q.WATCH_UNLOCK, {"key": key})

    async def open_migrations_mark(self) -> tuple[int, int]:
        """(how many, the newest id) of the changes of model not finalized."""
        cur = await self.conn.execute(q.OPEN_MIGRATIONS_MARK)
        row = await cur.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def open_migration_targets(self) -> set[str]:
        """The targets (by name) with a change of model not finalized."""
        cur = await self.conn.execute(q.OPEN_MIGRATION_TARGETS)
        return {str(r[0]) for r in await cur.fetchall()}

    async def open_changes_of_model(self) -> list[tuple[str, str]]:
        """(target, new provider section) of each change of model not finalized."""
        cur = await self.conn.execute(q.OPEN_CHANGES_OF_MODEL)
        return [(str(r[0]), str(r[1])) for r in await cur.fetchall()]

    async def open_migration(self, table_oid: int, column: str) -> dict[str, Any] | None:
        """The change of model under way on this column (not finalized), if any."""
        cur = await self.conn.execute(q.OPEN_MIGRATION, {"table_oid": table_oid, "column": column})
        return await _one_dict(cur)

    async def latest_migration(self, table_oid: int, column: str) -> dict[str, Any] | None:
        """The change under way on this column, else the last one finalized."""
        cur = await self.conn.execute(
            q.LATEST_MIGRATION, {"table_oid": table_oid, "column": column}
        )
        return await _one_dict(cur)

    async def latest_migration_of(self, target: str) -> dict[str, Any] | None:
        """The change under way of the target so named, else its last one finalized."""
        cur = await self.conn.execute(q.LATEST_MIGRATION_OF, {"target": target})
        return await _one_dict(cur)

    async def column_exists(self, table_oid: int, column: str) -> bool:
        """Whether the table (by oid) still has the column (False when the table is gone)."""
        cur = await self.conn.execute(q.COLUMN_EXISTS, {"oid": table_oid, "column": column})
        row = await cur.fetchone()
        return bool(row and row[0])

    async def finalized_migrations_since(self, since: Any) -> list[tuple[str, str | None, bool]]:
        """(target, new provider section, cut over) of each change of model finalized
        since then."""
        cur = await self.conn.execute(q.FINALIZED_MIGRATIONS_SINCE, {"since": since})
        return [(str(t), p, bool(c)) for t, p, c in await cur.fetchall()]

    async def migration_target(self, migration_id: int) -> str | None:
        """The target name a change of model was started for."""
        cur = await self.conn.execute(q.MIGRATION_TARGET, {"id": migration_id})
        row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def insert_migration(self, **values: Any) -> int:
        values = values | {k: Jsonb(values[k]) for k in ("from_model", "to_model", "home")}
        cur = await self.conn.execute(q.INSERT_MIGRATION, values)
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def set_migration_phase(
        self, migration_id: int, phase: str, *, was: str | None = None
    ) -> bool:
        """Move the change to ``phase`` (only from ``was``, when given); False when it was
        at another phase meanwhile (a rollback)."""
        cur = await self.conn.execute(
            q.SET_MIGRATION_PHASE, {"id": migration_id, "phase": phase, "was": was}
        )
        return await cur.fetchone() is not None

    async def lock_migration_phase(self, migration_id: int) -> str | None:
        """The change's phase, its row locked until this transaction ends."""
        cur = await self.conn.execute(q.LOCK_MIGRATION_PHASE, {"id": migration_id})
        row = await cur.fetchone()
        return str(row[0]) if row else None

    async def set_migration_job(self, migration_id: int, job_id: int) -> None:
        await self.conn.execute(q.SET_MIGRATION_JOB, {"id": migration_id, "job_id": job_id})

    async def set_migration_gates(self, migration_id: int, gates: dict[str, Any]) -> None:
        await self.conn.execute(q.SET_MIGRATION_GATES, {"id": migration_id, "gates": Jsonb(gates)})

    async def cut_over(self, migration_id: int) -> None:
        await self.conn.execute(q.CUT_OVER, {"id": migration_id})

    async def finalized(self, migration_id: int) -> None:
        await self.conn.execute(q.FINALIZED, {"id": migration_id})

    async def set_active_model(self, **values: Any) -> None:
        await self.conn.execute(q.SET_ACTIVE_MODEL, values)

    async def active_model(self, target: str) -> dict[str, Any] | None:
        cur = await self.conn.execute(q.ACTIVE_MODEL, {"target": target})
        return await _one_dict(cur)

    async def listen_changes(self) -> None:
        await self.conn.execute(q.LISTEN_CHANGES)

    async def changed_columns(self, columns: list[int]) -> list[int]:
        """Which of ``columns`` have rows in the change queue."""
        cur = await self.conn.execute(q.CHANGED_COLUMNS, {"columns": columns})
        return [int(r[0]) for r in await cur.fetchall()]

    async def finish_chunk(
        self, run_id: int, seq: int, worker: str, attempt: int, state: str = "done"
    ) -> bool:
        """False when the chunk was handed to another worker meanwhile."""
        cur = await self.conn.execute(
            q.FINISH_CHUNK,
            {"run_id": run_id, "seq": seq, "worker": worker, "attempt": attempt, "state": state},
        )
        return await cur.fetchone() is not None

    async def release_chunk(self, run_id: int, seq: int, worker: str, attempt: int) -> None:
        await self.conn.execute(
            q.RELEASE_CHUNK, {"run_id": run_id, "seq": seq, "worker": worker, "attempt": attempt}
        )

    async def open_chunks(self, run_id: int) -> tuple[int, int]:
        """(todo, doing) chunks of the job."""
        cur = await self.conn.execute(q.OPEN_CHUNKS, {"run_id": run_id})
        row = await cur.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    async def cancel_chunks(self, run_id: int) -> None:
        """The job's chunks not started are cancelled (their queue entries, when rung,
        find nothing to claim)."""
        await self.conn.execute(q.CANCEL_CHUNKS, {"run_id": run_id})

    async def heartbeat_chunks(self, worker: str, chunks: Iterable[tuple[int, int]]) -> None:
        """Move the lease of these (run, chunk) that ``worker`` holds (a round trip even
        when it holds none: the caller learns that its connection is alive)."""
        held = sorted(chunks)
        await self.conn.execute(
            q.HEARTBEAT_CHUNKS,
            {"worker": worker, "runs": [r for r, _ in held], "seqs": [s for _, s in held]},
        )

    async def release_lost_chunks(self) -> list[tuple[int, int]]:
        """Chunks whose holder is gone (dead, or silent past its lease), back to todo."""
        cur = await self.conn.execute(q.RELEASE_LOST_CHUNKS)
        return [(int(r[0]), int(r[1])) for r in await cur.fetchall()]

    async def chunks_to_ring(
        self, limit: int, stale_s: float | None = None, pending: Iterable[str] = ()
    ) -> list[tuple[int, int, str, str | None, bool]]:
        """(run, chunk, target, fingerprint, platform key) of todo chunks to ring in the
        queue, marked rung: never rung, or (with ``stale_s``) rung that long ago and not
        ``pending``."""
        cur = await self.conn.execute(
            q.RING_CHUNKS, {"limit": limit, "stale_s": stale_s, "pending": sorted(pending)}
        )
        return [(int(r[0]), int(r[1]), str(r[2]), r[3], bool(r[4])) for r in await cur.fetchall()]

    async def has_stale_rung(self, stale_s: float) -> bool:
        cur = await self.conn.execute(q.STALE_RUNG, {"stale_s": stale_s})
        row = await cur.fetchone()
        return bool(row and row[0])

    async def run_state(self, run_id: int) -> dict[str, Any] | None:
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(q.RUN_STATE, {"id": run_id})
            return await cur.fetchone()

    async def save_worker(
        self, run_id: int, worker: str, host: str, pid: int, chunks: int, report: dict[str, Any]
    ) -> str:
        """This worker's report for the job, and the job's totals: "running",
        "cancelling" (someone asked the job to stop) or "over"."""
        await self.conn.execute(
            q.SAVE_WORKER,
            {
                "run_id": run_id,
                "worker": worker,
                "host": host,
                "pid": pid,
                "chunks": chunks,
                "report": Jsonb(report),
            },
        )
        cur = await self.conn.execute(q.SUM_WORKERS, {"run_id": run_id})
        row = await cur.fetchone()
        if row is None or row[1] != "running":
            return "over"
        return "cancelling" if row[0] else "running"

    async def refuse_job(self, run_id: int, worker: str, host: str, pid: int, setting: str) -> None:
        await self.conn.execute(
            q.REFUSE_JOB,
            {"run_id": run_id, "worker": worker, "host": host, "pid": pid, "refused": setting},
        )

    async def has_chunks(self, run_id: int) -> bool:
        cur = await self.conn.execute(q.CHUNKS_OF_RUN, {"run_id": run_id})
        row = await cur.fetchone()
        return bool(row and row[0])

    async def job_workers(self, run_id: int) -> list[dict[str, Any]]:
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(q.JOB_WORKERS, {"run_id": run_id})
            return await cur.fetchall()

    async def job_tallies(self, run_id: int) -> list[tuple[str | None, str, int]]:
        """(tenant, worker, rows written) committed for the job."""
        cur = await self.conn.execute(q.JOB_TALLIES, {"run_id": run_id})
        return [(r[0], str(r[1]), int(r[2])) for r in await cur.fetchall()]

    async def job_failed(self, run_id: int) -> dict[str | None, int]:
        """Rows failed per tenant, each once."""
        cur = await self.conn.execute(q.JOB_FAILED, {"run_id": run_id})
        return {r[0]: int(r[1]) for r in await cur.fetchall()}

    async def job_chunks(self, run_id: int) -> dict[str, Any]:
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(q.JOB_CHUNKS, {"run_id": run_id})
            row = await cur.fetchone()
            assert row is not None
            return row

    async def first_failures(self, run_id: int, limit: int) -> list[Failure]:
        cur = await self.conn.execute(q.FIRST_FAILURES, {"run_id": run_id, "limit": limit})
        return [
            Failure(id=r[0], tenant=r[1], error_class=r[2], error=r[3], attempts=r[4])
            for r in await cur.fetchall()
        ]

    async def finish_job(self, report: Report, error: str | None) -> bool:
        """Record the job's end; False when another worker already did."""
        cur = await self.conn.execute(
            q.FINISH_JOB,
            self._counts(report)
            | {
                "estimated_cost_usd": round(report.estimated_cost_usd, 6),
                "report": Jsonb(report.to_dict()),
                "error": error,
                "progress": Jsonb(report.progress()),
            },
        )
        return await cur.fetchone() is not None

    async def hold_worker_lock(self, worker: str) -> None:
        await self.conn.execute(q.WORKER_LOCK, {"key": f"embedfill:worker:{worker}"})

    async def queue_search_path(self) -> None:
        """This session finds procrastinate's tables and functions (schema embedfill);
        pg_catalog, not in the path, is still searched first."""
        await self.conn.execute(q.QUEUE_SEARCH_PATH)

    # ---------------------------------------------------------------- rate budgets

    async def reserve_budget(
        self,
        key_id: str,
        *,
        requests: float,
        tokens: float,
        req_rate: float,
        req_cap: float,
        tok_rate: float,
        tok_cap: float,
    ) -> tuple[float, float, float]:
        """Take one request's cost from the key's shared buckets: (request level, token
        level, seconds still paused)."""
        cur = await self.conn.execute(
            q.RESERVE_BUDGET,
            {
                "key_id": key_id,
                "requests": requests,
                "tokens": tokens,
                "req_rate": req_rate,
                "req_cap": req_cap,
                "tok_rate": tok_rate,
                "tok_cap": tok_cap,
            },
        )
        row = await cur.fetchone()
        assert row is not None
        return float(row[0]), float(row[1]), float(row[2])

    async def paused_for(self, key_id: str) -> float:
        """Seconds the key is still paused (0 when it is not, or has no budget yet)."""
        cur = await self.conn.execute(q.PAUSED_FOR, {"key_id": key_id})
        row = await cur.fetchone()
        return float(row[0]) if row else 0.0

    async def pause_budget(self, key_id: str, seconds: float) -> None:
        await self.conn.execute(q.PAUSE_BUDGET, {"key_id": key_id, "seconds": seconds})

    # ---------------------------------------------------------------- keys

    async def put_key(self, tenant: str, ciphertext: bytes, key_hint: str) -> None:
        """Store the tenant's key; its rows that failed and wait for a retry (a watch's)
        go at once, with the new key."""
        async with self.conn.transaction():
            await self.conn.execute(
                q.UPSERT_KEY, {"tenant": tenant, "ciphertext": ciphertext, "key_hint": key_hint}
            )
            await self.retry_tenant_now(tenant)

    async def get_key(self, tenant: str) -> bytes | None:
        cur = await self.conn.execute(q.GET_KEY, {"tenant": tenant})
        row = await cur.fetchone()
        return bytes(row[0]) if row else None

    async def list_keys(self) -> list[KeyInfo]:
        cur = await self.conn.execute(q.LIST_KEYS)
        return [KeyInfo(r[0], r[1], r[2]) for r in await cur.fetchall()]

    async def delete_key(self, tenant: str) -> bool:
        cur = await self.conn.execute(q.DELETE_KEY, {"tenant": tenant})
        return cur.rowcount > 0


async def _one_dict(cur: Any) -> dict[str, Any] | None:
    row = await cur.fetchone()
    if row is None:
        return None
    return {d.name: v for d, v in zip(cur.description, row, strict=True)}
