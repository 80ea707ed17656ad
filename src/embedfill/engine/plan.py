"""A dry run (``embedfill backfill --dry-run``): the scan and batching of a real run,
nothing sent or written but its row in the audit trail. Apart from a worker's session
(run.py): the scanner and the ledger alone, no embedder, writer or writer lanes; its
reads on the caller's connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import psycopg

from ..db import homes
from ..db.catalog import count_missing, count_outdated
from ..db.target_sql import BLANK
from ..errors import first_line as _first_line
from ..freshness import mixing_warning
from ..models import Report
from ..planning import estimate_cost
from .scan import Scanner
from .state import RunState
from .tally import Ledger

log = logging.getLogger(__name__)


class Planner:
    """What a backfill of one target would do: rows, batches, requests, tokens, cost."""

    def __init__(self, state: RunState) -> None:
        assert state.opts.dry_run, "a real backfill is a job: see application.abackfill"
        self.state = state
        self.ledger = Ledger(self.state)
        self.scanner = Scanner(self.state, self.ledger)

    async def plan(self) -> Report:
        """The plan, as a report; its row in the audit trail is a dry run's."""
        started = time.monotonic()
        await self.state.resolve_provenance(create=False)
        missing = await count_missing(self.state.conn, self.state.sql, self.state.tenants)
        self.state.report.missing_before = min(missing, self.state.opts.limit or missing)
        await self._unmirrored()
        if self.state.refresh:
            stale, outdated = await count_outdated(
                self.state.conn, self.state.sql, self.state.tenants, self.state.prov.params()
            )
            self.state.report.stale_before = stale + outdated
            if outdated:
                self.state.report.warnings.append(mixing_warning(self.state.target.name, outdated))
        run_id = await self.state.store.create_run(
            target=self.state.target.name,
            actor=self.state.opts.actor,
            parameters=self.state.opts.parameters(),
            dry_run=True,
            missing_before=self.state.report.missing_before,
            table_oid=self.state.info.oid,
            column=self.state.target.embedding_column,
        )
        self.state.report.run_id = run_id
        if self.state.hooks.on_start:
            self.state.hooks.on_start(run_id)
        log.info("run %s: planning %s, %d rows missing", run_id, self.state.target.name, missing)
        error: str | None = None
        try:
            await self.scanner.plan()
        except BaseException as exc:
            self.state.report.status = "failed"
            error = _first_line(exc) if isinstance(exc, Exception) else "interrupted"
            raise
        finally:
            self.state.report.duration_s = time.monotonic() - started
            self.state.report.estimated_cost_usd = estimate_cost(
                self.state.report.tokens, self.state.pconf.price
            )
            if self.state.report.status != "failed":
                self.state.report.status = self._final_status()
            with contextlib.suppress(psycopg.Error):
                await asyncio.shield(self.ledger.flush_audit(final=True, error=error))
        return self.state.report

    async def _unmirrored(self) -> None:
        """A side table's live rows that have no side row yet: counted missing, but the
        scan walks the side table, so they are not in the plan's batches and cost (a
        plan writes nothing; a backfill gives them their side rows first)."""
        side = self.state.sql
        if side.live is None:
            return
        cur = await self.state.conn.execute(homes.unmirrored(side), {"blank": BLANK})
        row = await cur.fetchone()
        if row is not None and row[0]:
            self.state.report.warnings.append(
                f"{row[0]} rows of {side.live.table.as_string(self.state.conn)} have no row "
                "in the side table yet: the backfill gives them one first, and their tokens "
                "and cost are not in this plan."
            )

    def _final_status(self) -> str:
        if self.state.hooks.cancel.is_set():
            return "cancelled"
        return "partial" if self.state.report.failed else "succeeded"
