"""The embeddings' health as alerting reads it: bounds on missing and stale rows
(``embedfill check``) and the numbers the admin service's ``/metrics`` exposes.

``check`` is one status pass (``application.astatus``) judged against two bounds:

- ``max_missing``: rows whose embedding is NULL;
- ``max_stale``: vectors that no longer describe their row, i.e. ``stale`` (the text
  changed since it was embedded) plus ``outdated_model`` (embedded with another
  provider, model or dimensions than configured now). Both are fixed the same way
  (``backfill --refresh``), and both mean search answers from a wrong vector.

``unverified`` vectors (written by other code, no provenance) are shown, never judged:
they may well be right, and ``adopt`` or ``verify`` is how to find out.

Both bounds default to 0: "every row embedded and fresh", what a CI step or a check
after a migration asserts. A live table whose rows arrive between two ``watch`` passes
needs a bound that allows for them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from .application import astatus
from .config import Config
from .db.connect import Database, connect
from .db.store import Store
from .errors import EmbedfillError, UsageError
from .models import NO_TENANT, TargetStatus

log = logging.getLogger(__name__)

#: exit code of ``embedfill check`` when a target is over a bound
OVER_BOUND_EXIT_CODE = 3


@dataclass(frozen=True)
class Bounds:
    """What ``check`` tolerates per target."""

    max_missing: int = 0
    max_stale: int = 0  # stale + outdated_model
    #: missing rows tolerated per tenant (None: no per-tenant bound): one tenant whose
    #: rows are all NULL (its key revoked) fails the check even when the total is small
    tenant_max_missing: int | None = None

    def __post_init__(self) -> None:
        for flag, value in (
            ("--max-missing", self.max_missing),
            ("--max-stale", self.max_stale),
            ("--tenant-max-missing", self.tenant_max_missing),
        ):
            if value is not None and value < 0:
                raise UsageError(f"{flag} must be 0 or more, not {value}.")


@dataclass(frozen=True)
class CheckResult:
    """One target judged against the bounds."""

    target: str
    rows: int
    missing: int
    stale: int
    outdated_model: int
    unverified: int
    max_missing: int
    max_stale: int
    tenant_max_missing: int | None = None
    #: the tenants over ``tenant_max_missing``: (tenant, missing), most missing first
    tenants_over: tuple[tuple[str | None, int], ...] = ()
    # since a cutover (TargetStatus.cut_over_to): the column's outdated-model vectors
    # are kept for a rollback on purpose, and count toward no bound
    cut_over_to: str | None = None

    @property
    def over(self) -> list[str]:
        """The bounds this target is over: "missing", "stale", "tenant_missing" (in that
        order)."""
        out = []
        if self.missing > self.max_missing:
            out.append("missing")
        outdated = 0 if self.cut_over_to is not None else self.outdated_model
        if self.stale + outdated > self.max_stale:
            out.append("stale")
        if self.tenants_over:
            out.append("tenant_missing")
        return out

    @property
    def ok(self) -> bool:
        return not self.over

    def line(self) -> str:
        """``ok tickets: 0 missing (max 0), 3 stale + 0 outdated model (max 10), 15
        unverified`` (``FAIL`` when over a bound)."""
        line = (
            f"{'ok' if self.ok else 'FAIL'} {self.target}: "
            f"{self.missing} missing (max {self.max_missing}), "
            f"{self.stale} stale + {self.outdated_model} outdated model (max {self.max_stale}), "
            f"{self.unverified} unverified"
        )
        if self.cut_over_to is not None:
            line += f" (cut over to {self.cut_over_to}: the outdated model is kept for a rollback)"
        if self.tenant_max_missing is not None:
            shown = ", ".join(f"{_shown(t)} {n}" for t, n in self.tenants_over[:5])
            more = len(self.tenants_over) - 5
            line += (
                f"; {len(self.tenants_over)} tenants over {self.tenant_max_missing} missing"
                + (f": {shown}" if shown else "")
                + (f" and {more} more" if more > 0 else "")
            )
        return line

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``check --json``; the per-tenant keys only with that bound."""
        out = {
            "target": self.target,
            "ok": self.ok,
            "over": self.over,
            "rows": self.rows,
            "missing": self.missing,
            "max_missing": self.max_missing,
            "stale": self.stale,
            "outdated_model": self.outdated_model,
            "max_stale": self.max_stale,
            "unverified": self.unverified,
        }
        if self.cut_over_to is not None:
            out["cut_over_to"] = self.cut_over_to
        if self.tenant_max_missing is not None:
            out["tenant_max_missing"] = self.tenant_max_missing
            out["tenants_over"] = [{"tenant": t, "missing": n} for t, n in self.tenants_over]
        return out


def _shown(tenant: str | None) -> str:
    """A tenant's name on the line's one line: control characters escaped."""
    if tenant is None:
        return NO_TENANT
    if tenant.isprintable():
        return tenant
    return tenant.encode("unicode_escape").decode("ascii")


def evaluate(status: TargetStatus, bounds: Bounds) -> CheckResult:
    """Pure: one target's status against the bounds."""
    return CheckResult(
        target=status.name,
        rows=status.rows,
        missing=status.missing,
        stale=status.stale,
        outdated_model=status.outdated_model,
        unverified=status.unverified,
        cut_over_to=status.cut_over_to,
        max_missing=bounds.max_missing,
        max_stale=bounds.max_stale,
        tenant_max_missing=bounds.tenant_max_missing,
        tenants_over=tuple(
            sorted(
                (
                    (t.tenant, t.missing)
                    for t in status.tenants
                    if bounds.tenant_max_missing is not None
                    and t.missing > bounds.tenant_max_missing
                ),
                key=lambda pair: (-pair[1], str(pair[0])),
            )
        ),
    )


async def acheck(
    config: Config, db: Database, targets: Sequence[str] = (), bounds: Bounds = Bounds()
) -> list[CheckResult]:
    """Each of ``targets`` (default: every configured target, in config order) judged
    against ``bounds``: one status pass, read-only. An unknown target is TargetNotFound
    before the database is touched; an unreachable database or a table that does not
    match its target raises as ``status`` does (not a failed check)."""
    names = list(dict.fromkeys(targets)) or [t.name for t in config.targets]
    for name in names:
        target = config.target(name)
        if bounds.tenant_max_missing is not None and target.tenant_column is None:
            raise UsageError(
                f"--tenant-max-missing bounds each tenant's rows, but target {name!r} has no "
                "tenant_column; leave the flag out, or check the targets that have one."
            )
    statuses: list[TargetStatus] = []
    for name in names:
        statuses.extend(await astatus(config, db, name))
    return [evaluate(s, bounds) for s in statuses]


# ---------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class RunningJobs:
    """A target's jobs not over yet, as one row of gauges: how long the oldest has run,
    how long the most silent one has gone without a worker reporting, and the rows done
    (embedded, skipped or failed) so far; flat while a job is stuck."""

    target: str
    running_s: float
    silent_s: float
    rows_done: int
    chunks_queued: int = 0  # work waiting for a worker or in its hands (0: an idle watch)


async def status_by_target(
    config: Config, db: Database
) -> tuple[dict[str, TargetStatus], dict[str, EmbedfillError]]:
    """Every target's status, one pass each (a connection each), and the error of each
    target that cannot be inspected now (its table gone, or changed so that it no longer
    fits): its status gauges keep their last value (their timestamp says how old it is)
    and ``embedfill_target_error`` names the error."""
    out: dict[str, TargetStatus] = {}
    errors: dict[str, EmbedfillError] = {}
    for target in config.targets:
        try:
            (status,) = await astatus(config, db, target.name)
        except EmbedfillError as exc:
            log.warning("metrics: no status for target %s: %s", target.name, exc)
            errors[target.name] = exc
            continue
        out[target.name] = status
    return out, errors


async def job_gauges(db: Database) -> tuple[list[RunningJobs], int | None]:
    """Jobs queued or running, per target, and the worker processes alive (holding
    their control connection's lock), on one connection (reads embedfill.runs, chunks
    and pg_locks only; cheap). ([], None) before embedfill's schema exists."""
    conn = await connect(db)
    try:
        store = Store(conn)
        rows = await store.running_jobs()
        alive = await store.workers_alive()
    except psycopg.Error:
        return [], None
    finally:
        await conn.close()
    return [RunningJobs(*row) for row in rows], alive
