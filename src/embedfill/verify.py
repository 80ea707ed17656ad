"""Verify and adopt: are the stored vectors what the provider makes of their rows' text?

``verify`` re-embeds a random sample of the rows that hold a vector (or every such row)
with the provider the target is configured with and compares each fresh vector with the
stored one by cosine similarity. The text sent is exactly what a backfill sends: rendered
from the template (or text_sql), then cut to the model's input limit; a row whose text is
blank is not checked. Rows are batched per tenant and ``batch_size`` like a backfill,
each tenant's own key pays for its rows (keys.KeyResolver: the key store, then
``tenant_key_sql``, then the platform key where the target allows it), the key's shared
rate limits are honoured, and every answer goes through the provider checks and the
retry policy (providers/answers.py, retry.py). Nothing is written to the user's table.

A stored vector agrees when its cosine with the fresh vector is at least the provider's
``verify_min_cosine`` (default 0.99: remote models are not bit-exact). Where the cosine
is not defined (a stored zero vector, another size than the fresh vector, a NaN or an
infinite value) the stored vector is counted as mismatched with cosine ``None``: it
cannot be shown to agree. A fresh vector holding NaN or infinity is the provider's
fault, not the stored vector's: that row is reported as failed (not checked).

The sample is cheap on a big table: ``TABLESAMPLE SYSTEM`` reads a few pages per row
wanted, the pick sorts ids only, and only the picked rows' vectors are read
(target_sql.sample). It falls back to reading every page's ids when those pages held too
few rows with a vector (a table still mostly NULL).

``adopt`` records provenance (freshness.py) for vectors embedfill has none for
(``unverified``), without calling the provider: the md5 of each row's text as it renders
now and the model configured now, in pages of ``ADOPT_PAGE_ROWS`` rows, one statement
and one transaction each; provenance embedfill wrote itself is never overwritten. With a
verify sample first, it refuses (``VerificationFailed``, exit 3, nothing written) when
any sampled unverified vector disagrees or could not be checked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg

from .concurrency import Concurrency
from .config import ProviderConfig, TargetConfig, text_renderer
from .db.catalog import TableInfo, table_pages
from .db.store import Store
from .db.target_sql import WRONG_MD5
from .embedding import Client
from .errors import (
    AuthFailed,
    BadInput,
    ProviderError,
    ProviderMisconfigured,
    ProviderRejectsAll,
    UsageError,
    VerificationFailed,
)
from .freshness import ProvenanceIds, model_identity, provenance_ids
from .keys import KeyResolver
from .models import Batch, KeySource, Row, tenant_part
from .planning import TenantBatcher, estimate_cost, prepare_text
from .providers import Provider, Vector
from .ratelimit import Rates, SharedLimits

DEFAULT_SAMPLE = 100
ADOPT_PAGE_ROWS = 10_000  # rows per adopt statement (and transaction)
PAGE_ROWS = 1_000  # rows per page of `verify --all`
PAGES_PER_ROW = 4  # a sample reads about this many of the table's pages per row wanted
WHOLE_TABLE_SHARE = 0.2  # a sample that would read more of the pages than this reads all
MAX_CONCURRENCY = 4  # requests in flight (at most the provider's max_concurrency)
NAMED_ROWS = 10  # a refusal names at most this many rows
LISTED_FAILURES = 100  # rows not checked listed one by one (all are counted)

StoredVector = npt.NDArray[np.float32]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------- pure decisions


def sample_size(sample: int | None, all_rows: bool) -> int | None:
    """The rows to sample (None: every row with a vector); UsageError for a bad choice."""
    if sample is not None and all_rows:
        raise UsageError("Use --sample N or --all, not both.")
    if sample is not None and sample < 1:
        raise UsageError(f"--sample must be at least 1, not {sample}.")
    if all_rows:
        return None
    return DEFAULT_SAMPLE if sample is None else sample


def sample_percents(wanted: int, pages: int) -> list[float]:
    """The ``TABLESAMPLE SYSTEM`` percentages to try, in order, for a sample of ``wanted``
    rows of a table of ``pages`` pages: about ``PAGES_PER_ROW`` pages per row wanted (so
    the rows come from many places of the table, not a few neighbours), then every page
    in case those held too few rows with a vector. A table that small, or never analysed
    (0 pages), is read whole at once."""
    if pages <= 0:
        return [100.0]
    share = wanted * PAGES_PER_ROW / pages
    if share >= WHOLE_TABLE_SHARE:
        return [100.0]
    return [100.0 * share, 100.0]


def cosine(stored: StoredVector | None, fresh: Vector) -> float | None:
    """Cosine similarity in float64; None where it is not defined (no stored vector,
    another size, a zero vector, a NaN or infinite value)."""
    if stored is None or stored.shape != fresh.shape:
        return None
    a, b = stored.astype(np.float64), fresh.astype(np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    norms = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    if norms == 0.0 or not np.isfinite(norms):
        return None
    return float(np.clip(a @ b / norms, -1.0, 1.0))


def agrees(value: float | None, threshold: float) -> bool:
    """Whether a stored vector agrees: a defined cosine at or above the threshold."""
    return value is not None and value >= threshold


# ------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Mismatch:
    id: Any
    tenant: str | None
    cosine: float | None  # None: not defined (see the module doc)


@dataclass(frozen=True)
class Unchecked:
    """A row that could not be re-embedded (no key, the provider refused it)."""

    id: Any
    tenant: str | None
    error: str


@dataclass
class TenantCheck:
    tenant: str | None
    rows: int = 0  # rows read that hold a vector
    checked: int = 0
    skipped: int = 0  # blank text: nothing to compare
    failed: int = 0  # not checked (dry run: would not be): no key, or refused
    mismatched: int = 0
    requests: int = 0
    tokens: int = 0
    key_source: KeySource = "none"
    error: str | None = None


@dataclass
class VerifyResult:
    """What ``verify`` checked (or, ``dry_run``, would check and what it would cost)."""

    target: str
    provider: str
    threshold: float  # the provider's verify_min_cosine
    sample: int | None  # rows asked for; None: every row with a vector
    dry_run: bool = False
    rows: int = 0
    checked: int = 0
    skipped: int = 0
    truncated: int = 0
    failed: int = 0
    mismatched: list[Mismatch] = field(default_factory=list)
    min_cosine: float | None = None  # the lowest defined cosine; None when none was
    requests: int = 0
    retries: int = 0
    tokens: int = 0
    estimated_cost_usd: float = 0.0
    tenants: list[TenantCheck] = field(default_factory=list)
    failures: list[Unchecked] = field(default_factory=list)  # the first LISTED_FAILURES
    # the wrong vectors recorded as such (stale from now on: status, check, watch and
    # --refresh act on them, adopt never blesses them); --fix: the refresh that followed
    marked_wrong: int = 0
    fixed: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """Every row read was checked (or skipped as blank) and agrees."""
        return not self.mismatched and not self.failed

    @property
    def exit_code(self) -> int:
        """0 all agree (or ``--fix`` re-embedded the wrong ones); 3 a vector disagrees or a
        row could not be (dry run: would not be) checked."""
        fixed = self.fixed is not None and self.fixed.get("status") == "succeeded"
        return 0 if self.ok or (fixed and not self.failed) else 3

    def tenant(self, tenant: str | None) -> TenantCheck:
        return tenant_part(self, self.tenants, tenant, TenantCheck)

    def record(self, row: Row, value: float | None) -> None:
        """One row compared."""
        tenant = self.tenant(row.tenant)
        tenant.checked += 1
        self.checked += 1
        if value is not None:
            self.min_cosine = value if self.min_cosine is None else min(self.min_cosine, value)
        if not agrees(value, self.threshold):
            tenant.mismatched += 1
            self.mismatched.append(Mismatch(row.id, row.tenant, value))

    def fail(self, rows: Sequence[Row], reason: str) -> None:
        for row in rows:
            self.tenant(row.tenant).failed += 1
            self.failed += 1
            if len(self.failures) < LISTED_FAILURES:  # a keyless tenant of --all: millions
                self.failures.append(Unchecked(row.id, row.tenant, reason))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["min_cosine"] = _rounded(self.min_cosine)
        data["estimated_cost_usd"] = round(self.estimated_cost_usd, 6)
        for m in data["mismatched"]:
            m["id"] = _jsonable(m["id"])
            m["cosine"] = _rounded(m["cosine"])
        for f in data["failures"]:
            f["id"] = _jsonable(f["id"])
        return data


@dataclass
class AdoptResult:
    target: str
    model: str
    adopted: int = 0
    verified: VerifyResult | None = None  # --verify-sample: the check that came first

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "model": self.model,
            "adopted": self.adopted,
            "verify": None if self.verified is None else self.verified.to_dict(),
        }


def refusal(checked: VerifyResult) -> str:
    """Why adopt refuses, in one sentence naming the rows."""
    if checked.mismatched:
        shown = ", ".join(
            f"{m.id} (tenant {m.tenant}, cosine "
            f"{'undefined' if m.cosine is None else f'{m.cosine:.4f}'})"
            for m in checked.mismatched[:NAMED_ROWS]
        )
        more = len(checked.mismatched) - NAMED_ROWS
        shown += f" and {more} more" if more > 0 else ""
        return (
            f"{len(checked.mismatched)} of {checked.checked} sampled vectors of target "
            f"{checked.target!r} disagree with {checked.provider} (cosine below "
            f"{checked.threshold:g}): rows {shown}; nothing was adopted (set those "
            "embeddings to NULL and run `embedfill backfill`, or check the provider's "
            "model and dimensions)."
        )
    first = checked.failures[0]
    return (
        f"{checked.failed} sampled rows of target {checked.target!r} could not be "
        f"re-embedded (row {first.id}, tenant {first.tenant}: {first.error}); nothing "
        "was adopted."
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


# ------------------------------------------------------------------------ the work


class Verifier:
    """Reads rows of one target, re-embeds them and compares; records adopted rows."""

    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any],
        target: TargetConfig,
        pconf: ProviderConfig,
        info: TableInfo,
        provider: Provider,
        env: Mapping[str, str],
    ) -> None:
        self.conn, self.target, self.pconf, self.info = conn, target, pconf, info
        self.provider = provider
        self.sql = info.sql(target)
        store = Store(conn)
        self.keys = KeyResolver(store, conn, target, pconf, provider.needs_key, env)
        self.limits: SharedLimits | None = None
        if provider.needs_key or pconf.rpm or pconf.tpm:  # as a backfill shares them
            scope = f"{pconf.kind}|{pconf.base_url or ''}|{pconf.model}"
            self.limits = SharedLimits(store, Rates(pconf.rpm, pconf.tpm), scope)
        self.render = text_renderer(target.text, target.text_columns)
        self.counter = provider.counter()
        self.dead: dict[str | None, str] = {}  # tenants whose key the provider rejected
        self.tally = _VerifyTally()
        # the provider as a backfill uses it (embedding/client.py): the same keys, shared
        # limits and the provider's rate-limit headers, retries, the probe
        self.client = Client(
            provider=provider,
            pconf=pconf,
            keys=self.keys,
            limits=self.limits,
            concurrency=Concurrency.fixed(max(1, min(MAX_CONCURRENCY, pconf.max_concurrency))),
            tally=self.tally,
            count_tokens=self.counter.count,
        )

    def result(self, sample: int | None, dry_run: bool) -> VerifyResult:
        self.tally.result = VerifyResult(
            target=self.target.name,
            provider=self.provider.name,
            threshold=self.pconf.verify_min_cosine,
            sample=sample,
            dry_run=dry_run,
        )
        return self.tally.result

    async def verify(
        self,
        sample: int | None,
        *,
        dry_run: bool = False,
        unverified: bool = False,
        fresh: bool = False,
        prov: ProvenanceIds | None = None,
        mark: bool = True,
    ) -> VerifyResult:
        """Check ``sample`` random rows holding a vector (None: every one), ``unverified``
        ones only with ``prov``, or (``fresh``, with ``prov``) only those embedfill wrote
        from the text they hold now: a row edited since is stale, not wrong. A dry run
        reads texts only and sends nothing."""
        result = self.result(sample, dry_run)
        params = prov.params() if prov else {}
        if sample is None:
            async for page in self._pages(vectors=not dry_run):
                await self._check(page, result)
        else:
            await self._check(
                await self._sample(sample, unverified, params, vectors=not dry_run, fresh=fresh),
                result,
            )
        result.mismatched.sort(key=lambda m: m.id)
        result.estimated_cost_usd = estimate_cost(result.tokens, self.pconf.price)
        if result.mismatched and mark and not dry_run:
            result.marked_wrong = await self._mark_wrong([m.id for m in result.mismatched])
        return result

    async def _mark_wrong(self, ids: list[Any]) -> int:
        """Record the wrong vectors (TargetSQL.mark_wrong), so that nothing takes them for
        right afterwards; one statement."""
        model = model_identity(self.pconf, self.info)
        known = await provenance_ids(
            self.conn, self.info, self.target.embedding_column, model, create=True
        )
        cur = await self.conn.execute(
            self.sql.mark_wrong(), {"ids": ids, "wrong": WRONG_MD5, **known.params()}
        )
        return cur.rowcount

    async def adopt(self, verify_sample: int | None) -> AdoptResult:
        """Provenance for every unverified vector; with ``verify_sample``, only when that
        many random unverified rows agree (else VerificationFailed, nothing written)."""
        model = model_identity(self.pconf, self.info)
        done = AdoptResult(self.target.name, str(model))
        column = self.target.embedding_column
        if verify_sample is not None:
            known = await provenance_ids(self.conn, self.info, column, model, create=False)
            # its refusal writes nothing (the rows stay unverified: `verify` records them)
            done.verified = await self.verify(
                verify_sample, unverified=True, prov=known, mark=False
            )
            if not done.verified.ok:
                raise VerificationFailed(refusal(done.verified), details=done.to_dict())
        ids = await provenance_ids(self.conn, self.info, column, model, create=True)
        done.adopted = await self._adopt_pages(ids)
        return done

    async def _adopt_pages(self, ids: ProvenanceIds) -> int:
        """Keyset pages of ``ADOPT_PAGE_ROWS`` rows, each one autocommitted statement."""
        adopted, after, first = 0, None, True
        while True:
            cur = await self.conn.execute(
                self.sql.adopt(first_page=first),
                {"after": after, "limit": ADOPT_PAGE_ROWS, **ids.params()},
            )
            row = await cur.fetchone()
            assert row is not None
            last, read, written = row
            adopted += int(written)
            if int(read) < ADOPT_PAGE_ROWS:
                return adopted
            after, first = last, False

    async def _sample(
        self,
        wanted: int,
        unverified: bool,
        params: dict[str, Any],
        *,
        vectors: bool,
        fresh: bool = False,
    ) -> list[Any]:
        pages = await table_pages(self.conn, self.info.oid)
        statement = self.sql.sample(unverified=unverified, vectors=vectors, fresh=fresh)
        rows: list[Any] = []
        for percent in sample_percents(wanted, pages):
            cur = await self.conn.execute(
                statement, {"percent": percent, "limit": wanted, **params}
            )
            rows = await cur.fetchall()
            if len(rows) >= wanted:
                break
        return rows

    async def _pages(self, *, vectors: bool) -> AsyncIterator[list[Any]]:
        after, first = None, True
        while True:
            cur = await self.conn.execute(
                self.sql.with_vectors(first_page=first, vectors=vectors),
                {"after": after, "limit": PAGE_ROWS},
            )
            rows = await cur.fetchall()
            if rows:
                yield rows
            if len(rows) < PAGE_ROWS:
                return
            after, first = rows[-1][0], False

    async def _check(self, raw_rows: Sequence[Any], result: VerifyResult) -> None:
        """Render, cut and batch rows as a backfill does, then re-embed and compare (a
        dry run tallies requests, tokens and each tenant's key source instead)."""
        rows: list[Row] = []
        stored: dict[Any, StoredVector | None] = {}
        for row_id, tenant, *values, vector in raw_rows:
            if vector is None and not result.dry_run:
                continue  # set to NULL since it was picked: nothing to compare
            result.rows += 1
            t = result.tenant(tenant)
            t.rows += 1
            prepared = prepare_text(
                self.render(values),
                count=self.counter.count,
                truncate=self.counter.truncate,
                max_tokens=self.provider.max_input_tokens,
            )
            if prepared is None:
                t.skipped += 1
                result.skipped += 1
                continue
            text, tokens, truncated = prepared
            result.truncated += truncated
            rows.append(
                Row(
                    id=row_id,
                    tenant=tenant,
                    text=text,
                    key=b"",
                    tokens=tokens,
                    truncated=truncated,
                )
            )
            stored[row_id] = None if vector is None else np.asarray(vector, dtype=np.float32)
        batcher = TenantBatcher(
            self.pconf.batch_size, self.pconf.max_request_tokens, max(1, len(rows))
        )
        batches = [b for row in rows for b in batcher.add(row)] + batcher.flush()
        for batch in batches:  # keys first, one at a time (the resolver caches them)
            resolved = await self.client.key(batch.tenant)
            result.tenant(batch.tenant).key_source = resolved.source
        if result.dry_run:
            for batch in batches:
                await self._plan(batch, result)
            return
        try:
            async with asyncio.TaskGroup() as tg:  # one error (the probe's) stops them all
                for batch in batches:
                    tg.create_task(self._compare(batch, stored, result))
        except* ProviderMisconfigured as group:
            raise group.exceptions[0] from None

    async def _plan(self, batch: Batch, result: VerifyResult) -> None:
        tenant = result.tenant(batch.tenant)
        resolved = await self.client.key(batch.tenant)
        if resolved.error:
            tenant.error = resolved.error
            result.fail(batch.rows, resolved.error)
            return
        tenant.requests += 1
        tenant.tokens += batch.tokens
        result.requests += 1
        result.tokens += batch.tokens

    async def _compare(
        self, batch: Batch, stored: dict[Any, StoredVector | None], result: VerifyResult
    ) -> None:
        tenant = result.tenant(batch.tenant)
        resolved = await self.client.key(batch.tenant)
        reason = resolved.error or self.dead.get(batch.tenant)
        if reason:
            tenant.error = reason
            result.fail(batch.rows, reason)
            return
        try:
            vectors, _ = await self.client.vectors(batch, resolved.key)
        except BadInput as exc:  # isolate the row the provider rejects
            halves = await self.client.rejected(batch, resolved.key, exc)
            if isinstance(halves, ProviderMisconfigured):  # the request (model, dimensions)
                raise halves from None
            if isinstance(halves, ProviderRejectsAll):  # an incident: not these texts
                result.fail(batch.rows, str(halves))
                return
            for half in halves:
                await self._compare(half, stored, result)
            if not halves:
                result.fail(batch.rows, str(exc))
            return
        except AuthFailed as exc:
            reason = f"{exc} (tenant {batch.tenant!r}, key source {resolved.source})"
            self.dead[batch.tenant] = reason
            tenant.error = reason
            result.fail(batch.rows, reason)
            return
        except ProviderError as exc:
            result.fail(batch.rows, str(exc))
            return
        for row, fresh in zip(batch.rows, vectors, strict=True):
            if not np.isfinite(fresh).all():
                result.fail([row], "The provider returned a vector holding NaN or infinite values.")
                continue
            result.record(row, cosine(stored[row.id], fresh))


class _VerifyTally:
    """What a verify counts as its client sends (embedding.Tally): the result's."""

    result: VerifyResult

    def sent(self, tenant: str | None) -> None:
        self.result.requests += 1
        self.result.tenant(tenant).requests += 1

    def probed(self) -> None:
        self.result.requests += 1

    def retrying(self, tenant: str | None, exc: ProviderError, delay: float) -> None:
        log.info(
            "verify of %s: tenant %s: %s; retrying in %.1fs", self.result.target, tenant, exc, delay
        )

    def retried(self) -> None:
        self.result.retries += 1

    def answered(self, tenant: str | None, tokens: int) -> None:
        self.result.tokens += tokens
        self.result.tenant(tenant).tokens += tokens

    def probe_answered(self, tokens: int) -> None:
        self.result.tokens += tokens

    def observed(self, status: str, seconds: float) -> None:
        pass
