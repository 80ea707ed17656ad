"""What the stages of a run share: the options and hooks a run is given, the chunk a
worker session feeds it, and ``RunState``, the state each stage object (scanner,
embedders, writers, ledger) is given, with the one way a run stops.

Every wait (rate limits, Retry-After, backoff) wakes at once when the run is cancelled;
the batches not yet sent stay NULL for the next run. A process that shuts down (the
CLI's SIGTERM, see ``abandon_requests``) abandons its provider requests in flight: their
rows stay NULL too, and a job that goes on gets the session's chunks back in its queue.
A problem that would fail every batch (the provider answers another size than the
column's, or rejects even a one-word request) halts the run: nothing more is sent, what
was answered is still written, and the run ends with the reason (exit 2 if nothing was
written, else RunAborted, exit 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from ..concurrency import Concurrency
from ..config import ProviderConfig, TargetConfig
from ..db.catalog import TableInfo
from ..db.connect import Database
from ..db.lanes import Lane, Lanes
from ..db.store import Store
from ..embedding import Client
from ..errors import EmbedfillError, ProviderError, RunAborted
from ..freshness import UNKNOWN, ProvenanceIds, model_identity, provenance_ids
from ..keys import KeyResolver, ResolvedKey
from ..models import Report, Row, TenantReport
from ..planning import BoundedCache, TenantBatcher
from ..providers import Provider, Vector
from ..ratelimit import Rates, SharedLimits
from ..tokens import TokenCounter

log = logging.getLogger(__name__)


ProgressCallback = Callable[[Report], None]

# Set by what owns the process's shutdown (the CLI, on SIGTERM or SIGINT plus a grace):
# once the event is set, every run started in this context (the tasks a worker or a
# backfill starts inherit it) abandons its provider requests in flight instead of
# waiting up to ``timeout_s`` for them, sends nothing more, and writes what was answered.
# The rows of an abandoned request stay NULL, never failed; a session of a job that goes
# on (the worker leaves, the job was not cancelled) hands its chunks back to the queue.
# A context variable rather than a parameter: a worker's sessions are created deep in
# the job queue's tasks, and they inherit it from the command that started them.
abandon_requests: ContextVar[asyncio.Event | None] = ContextVar("abandon_requests", default=None)
# how long a process that was asked to stop gives its provider requests in flight
ABANDON_AFTER_S = 4.0


NAMED_FALLBACKS = 10  # tenants billed to the platform key named one by one in warnings


@dataclass(frozen=True)
class BackfillOptions:
    target: str | None = None
    dry_run: bool = False
    batch_size: int | None = None
    tenants: Sequence[str] = ()
    limit: int | None = None
    actor: str = "library"
    defer_index: bool = False  # index-aware mode: see db/indexes.py
    refresh: bool = False  # also re-embed stale and outdated-model rows (freshness.py)

    def parameters(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "tenants": list(self.tenants),
            "limit": self.limit,
            "defer_index": self.defer_index,
            "refresh": self.refresh,
        }


@dataclass
class PendingWrite:
    rows: list[Row]
    vectors: list[Vector]


@dataclass(eq=False)
class Chunk:
    """One chunk of a job as a worker session works on it: the rows with lo < id <= hi
    (None: unbounded) still NULL. ``done`` resolves once every row read from it has been
    written, skipped or failed (or was given back, for a chunk given up)."""

    seq: int
    lo: Any
    hi: Any
    attempt: int = 1
    keys: list[str] | None = None  # a watch chunk: these ids (as text), not a range
    more: bool = False  # other chunks of the job were still to do when it was claimed
    pending: int = 0  # rows read, not yet written, failed or dropped
    scanned: bool = False
    given_up: bool = False  # handed back to the queue: its rows are dropped, not failed
    started: float = field(default_factory=time.monotonic)
    last_ok: float = field(default_factory=time.monotonic)
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def resolve(self, error: BaseException | None = None) -> None:
        if self.done.done():
            return
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)


class Observer:
    """Receives what a run does as it happens; the HTTP service turns it into metrics.
    The default does nothing."""

    def request(self, target: str, outcome: str, seconds: float) -> None:
        """One provider call: outcome is the HTTP status ("200", "429", ...) or "error"."""

    def rows(self, target: str, outcome: str, count: int) -> None:
        """Rows embedded, skipped or failed."""

    def tokens(self, target: str, count: int) -> None:
        """Tokens sent in successful requests."""

    def target_error(self, target: str, error_class: str | None) -> None:
        """A watched target reads fine (None), or stopped being watched with this class
        of error (its table changed so that it no longer fits)."""


@dataclass
class Hooks:
    on_progress: ProgressCallback | None = None
    on_start: Callable[[int], None] | None = None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    observer: Observer = field(default_factory=Observer)


@dataclass(frozen=True)
class WorkerSeat:
    """Where a worker session reports: the job (run) and this worker's row for it."""

    run_id: int
    name: str  # host:pid:suffix, unique per worker process
    host: str
    pid: int
    lease_s: float
    chunks_done: Callable[[], int] = lambda: 0
    # the worker's control connection (it holds the worker's liveness lock), lent for the
    # session's heartbeat: one connection per worker, however many jobs it works on
    control: Callable[[], contextlib.AbstractAsyncContextManager[Store]] | None = None
    # whether another chunk of the job is about to be handed in (the session's partial
    # batches may then wait for its rows, see scan.py)
    chunks_coming: Callable[[], bool] = lambda: False
    # the job's kind outlives a provider's incident (jobs/spec.py JobKind): a provider
    # that rejects every request, or answers vectors of another size, fails the batch's
    # rows for a later try instead of stopping the session
    outlives_provider_faults: bool = False


class RunState:
    """What a run's stage objects share (run.py gives it to each): the target, its SQL
    and the report (every stage); the de-duplication cache and the texts in flight
    (scanner and embedders); keys, shared limits, concurrency and the embedding client
    (embedders); the chunks of a worker session (scanner and ledger). What one stage
    alone keeps is its own (the writers' locked rows, the ledger's failures not yet
    recorded, the scanner's renderer). And the one way a run stops: ``stopping``,
    ``sleep`` (every wait), ``halt`` (a reason that fails every batch)."""

    def __init__(
        self,
        *,
        db: Database,
        lane: Lane,
        target: TargetConfig,
        pconf: ProviderConfig,
        info: TableInfo,
        opts: BackfillOptions,
        provider: Provider,
        engine: Any,
        hooks: Hooks,
        env: Mapping[str, str],
        seat: WorkerSeat | None = None,
        lanes: Lanes | None = None,
    ) -> None:
        self.seat = seat  # set: a worker's session of a job, fed chunk by chunk
        self.chunk_q: asyncio.Queue[Chunk | None] = asyncio.Queue()
        self.chunks: set[Chunk] = set()  # submitted, not yet resolved
        # reads go through the table lane, one statement at a time (``lane.hold``);
        # writes take a lane of the process's ``lanes`` (a dry run has none: it writes
        # no vector)
        self.lane, self.lanes = lane, lanes
        conn = lane.conn
        self.db, self.conn, self.target, self.pconf = db, conn, target, pconf
        self.opts, self.provider, self.engine, self.hooks = opts, provider, engine, hooks
        self.info = info
        self.sql = info.sql(target)
        self.refresh = opts.refresh
        # provenance numbers (freshness.py): resolved when the run starts
        self.prov = ProvenanceIds(UNKNOWN, UNKNOWN)
        self.store = Store(conn)
        self.keys = KeyResolver(self.store, conn, target, pconf, provider.needs_key, env)
        self.batch_size = opts.batch_size or pconf.batch_size
        self.batcher: TenantBatcher | None = None  # the scan's, while it runs (embed.py)
        self.tenants = list(opts.tenants) or None
        self.report = Report(
            run_id=seat.run_id if seat else None,
            target=target.name,
            dry_run=opts.dry_run,
            provider=provider.name,
        )
        dims = info.dimensions or 1536
        cache_rows = engine.dedup_cache_mb * 1024 * 1024 // (dims * 4 + 200)
        self.cache: BoundedCache[Vector] = BoundedCache(cache_rows)
        self.inflight: dict[Any, list[Row]] = {}
        # tenants with no usable key: why, and the digest of the key they died with
        # (another key, looked up every keys.KEY_TTL_S, revives the tenant)
        self.dead_tenants: dict[str | None, tuple[str, str]] = {}
        # rpm/tpm and 429 pauses, per key, shared with every run in every process; a
        # provider without keys or limits (local, hash) has nothing to share
        self.concurrency = (
            Concurrency.auto(pconf.max_concurrency)
            if pconf.auto_concurrency
            else Concurrency.fixed(pconf.max_concurrency)
        )
        self.limits: SharedLimits | None = None
        if provider.needs_key or pconf.rpm or pconf.tpm:
            scope = f"{pconf.kind}|{pconf.base_url or ''}|{pconf.model}"
            self.limits = SharedLimits(self.store, Rates(pconf.rpm, pconf.tpm), scope)
        self._tenants: dict[str | None, TenantReport] = {}
        self.counter: TokenCounter = provider.counter()  # loaded by _prepare
        self.dims = info.dimensions  # learnt from the first answer when neither side says
        self.stop_event = asyncio.Event()  # set on cancel, halt or abandon: every wait wakes up
        self._abandon = abandon_requests.get()  # set: the process abandons its requests
        self._abandoning = False
        self.halted: EmbedfillError | None = None  # why the run stops early, if it does
        self._fell_back: set[str | None] = set()  # tenants billed to the platform key
        self.closed = False  # a session that ended takes no chunk
        self.closed_by: Exception | None = None
        # the provider as every caller uses it (verify too): keys, the shared limits,
        # concurrency, retries, the probe; waits that end when this run stops
        self.client = Client(
            provider=provider,
            pconf=pconf,
            keys=self.keys,
            limits=self.limits,
            concurrency=self.concurrency,
            tally=_RunTally(self),
            db_turn=self.lane.hold,
            sleep=self.sleep,
            abandon=self._abandon,
            on_abandon=self.abandon_now,
            count_tokens=lambda text: self.counter.count(text),
            misconfig_ends=not (seat is not None and seat.outlives_provider_faults),
        )

    def note_key_source(self, tenant: str | None, resolved: ResolvedKey) -> None:
        """A tenant billed to the platform key by fallback (its own key was looked for and
        not found) is named in the warnings, once; past ``NAMED_FALLBACKS`` tenants, one
        sentence more says there are others (each tenant's ``key_source`` names them)."""
        if not resolved.fallback or tenant in self._fell_back:
            return
        self._fell_back.add(tenant)
        if len(self._fell_back) > NAMED_FALLBACKS:
            warning = (
                f"More than {NAMED_FALLBACKS} tenants have no API key of their own and are "
                f"billed to the platform key ({self.pconf.api_key_env}); see each tenant's "
                "key_source."
            )
        else:
            warning = (
                f"Tenant {tenant!r} has no API key of its own; its rows are billed to the "
                f"platform key ({self.pconf.api_key_env}). Store one with `embedfill keys "
                "set`, or set allow_platform_fallback = false to leave its rows NULL instead."
            )
        if warning not in self.report.warnings:
            self.report.warnings.append(warning)

    def tenant(self, tenant: str | None) -> TenantReport:
        """The tenant's report, from an index (Report.tenant scans a list)."""
        found = self._tenants.get(tenant)
        if found is None:
            found = self._tenants[tenant] = self.report.tenant(tenant)
        return found

    async def resolve_provenance(self, *, create: bool) -> None:
        """The target column's and the model's provenance numbers: a writer records them
        when new, a dry run only reads them."""
        async with self.lane.hold() as conn:
            self.prov = await provenance_ids(
                conn,
                self.info,
                self.target.embedding_column,
                model_identity(self.pconf, self.info),
                create=create,
            )

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set() or self.hooks.cancel.is_set()

    async def watch_cancel(self) -> None:
        await self.hooks.cancel.wait()
        self.stop_event.set()

    @property
    def abandoned(self) -> bool:
        """The process abandons its provider requests in flight (``abandon_requests``)."""
        return self._abandon is not None and self._abandon.is_set()

    async def watch_abandon(self) -> None:
        if self._abandon is not None:
            await self._abandon.wait()
            self.abandon_now()

    def abandon_now(self) -> None:
        """Stop for a shutdown (``abandon_requests``): nothing more is sent, the requests
        in flight are abandoned (embed.py), what was answered is still written. Unless
        the job was cancelled, the session's chunks go back to the queue (``given_up``)
        before any of their rows is dropped, so none is marked done with rows left NULL."""
        if self._abandoning:
            return
        self._abandoning = True
        back = [] if self.hooks.cancel.is_set() else sorted(self.chunks, key=lambda c: c.seq)
        for chunk in back:
            chunk.given_up = True
        if self.client.in_flight or back:
            log.warning(
                "run %s: shutting down: the provider requests in flight are abandoned, "
                "their rows stay NULL%s",
                self.report.run_id,
                f"; chunks {', '.join(str(c.seq) for c in back)} go back to the queue"
                if back
                else "",
            )
        self.stop_event.set()

    async def sleep(self, seconds: float) -> bool:
        """Wait, waking at once when the run is cancelled, halted or abandoned; True when
        it was."""
        if seconds > 0 and not self.stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self.stop_event.wait()
        return self.stopping

    def halt(self, reason: EmbedfillError) -> None:
        """Stop for a reason that would fail every batch: nothing more is sent, what was
        answered is still written, and the pipeline then raises the reason."""
        if self.halted is None:
            self.halted = reason
            log.info("run %s: stopping: %s", self.report.run_id, reason)
        self.stop_event.set()

    def halt_error(self) -> EmbedfillError:
        """The halt's reason as is (a config error, exit 2) when nothing was written;
        else RunAborted (exit 3): some rows were filled, so "nothing written" is false."""
        assert self.halted is not None
        if not self.report.embedded:
            return self.halted
        error = RunAborted(
            f"The run stopped after writing {self.report.embedded} rows: {self.halted}"
        )
        error.__cause__ = self.halted
        return error


class _RunTally:
    """What a run counts as its client sends (embedding.Tally): its report, its
    tenants' and the metrics."""

    def __init__(self, run: RunState) -> None:
        self.run = run

    def sent(self, tenant: str | None) -> None:
        self.run.report.requests += 1
        self.run.tenant(tenant).requests += 1

    def probed(self) -> None:
        self.run.report.requests += 1

    def retrying(self, tenant: str | None, exc: ProviderError, delay: float) -> None:
        log.info(
            "run %s: tenant %s: %s; retrying in %.1fs", self.run.report.run_id, tenant, exc, delay
        )

    def retried(self) -> None:
        self.run.report.retries += 1

    def answered(self, tenant: str | None, tokens: int) -> None:
        self.run.report.tokens += tokens
        self.run.hooks.observer.tokens(self.run.target.name, tokens)
        self.run.tenant(tenant).tokens += tokens

    def probe_answered(self, tokens: int) -> None:
        self.run.report.tokens += tokens

    def observed(self, status: str, seconds: float) -> None:
        self.run.hooks.observer.request(self.run.target.name, status, seconds)
