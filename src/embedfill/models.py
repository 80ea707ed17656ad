"""Small value types shared by planning, the engine and the renderers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, TypeVar

KeySource = Literal["tenant", "platform", "none"]


@dataclass(slots=True)
class Row:
    """One row read from a target table that needs an embedding. Not frozen: a frozen
    dataclass's __init__ costs four times as much, and the scan makes one per row."""

    id: Any
    tenant: str | None
    text: str
    key: Any  # the text as read, of one tenant: its md5 (16 bytes), with the
    # tenant where the target has a tenant column; the de-duplication key
    tokens: int = 0
    truncated: bool = False
    refresh: bool = False  # it held a vector (stale or outdated): a refresh
    text_md5: Any = None  # md5 of the rendered text as read (its provenance): 16 bytes
    chunk: Any = field(default=None, compare=False, repr=False)  # the job chunk it came from


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows of one tenant that go to the provider in one request."""

    tenant: str | None
    rows: tuple[Row, ...]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.rows)

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rows]


@dataclass
class TenantReport:
    tenant: str | None
    missing: int = 0
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    key_source: KeySource = "none"
    batches: int = 0
    requests: int = 0
    tokens: int = 0
    truncated: int = 0
    error: str | None = None
    would_fail: int = 0  # dry run: rows that would fail for want of a usable key


@dataclass(frozen=True)
class Sample:
    """A text as it would be sent (cut to ``SAMPLE_CHARS`` characters for display)."""

    id: Any
    tenant: str | None
    text: str


SAMPLE_CHARS = 300


@dataclass(frozen=True)
class Failure:
    id: Any
    tenant: str | None
    error: str
    error_class: str = "EmbedfillError"
    attempts: int = 1


@dataclass(frozen=True)
class Retry:
    """What a watch needs to send a failed row again (watch.py), recorded with its
    failure, never in a report: the text that failed, whether the provider rejected that
    text itself (then the row waits for its text to change; otherwise it is sent again
    after a backoff), and a digest of the key tried (a new key retries at once)."""

    text_md5: Any = None
    rejected_input: bool = False
    key_digest: str | None = None


P = TypeVar("P", bound="_HasTenant")


class _HasTenant(Protocol):
    tenant: str | None


def tenant_part(
    owner: object, parts: list[P], tenant: str | None, make: Callable[[str | None], P]
) -> P:
    """``tenant``'s entry of ``parts`` (a report's per-tenant list), added when new; found
    by an index kept on ``owner`` (not a dataclass field: a report's fields are what it
    shows), rebuilt when the list was set or grown directly."""
    index: dict[str | None, P] | None = owner.__dict__.get("_tenant_index")
    if index is None or len(index) != len(parts):
        index = owner.__dict__["_tenant_index"] = {p.tenant: p for p in parts}
    found = index.get(tenant)
    if found is None:
        found = index[tenant] = make(tenant)
        parts.append(found)
    return found


@dataclass
class Report:
    """What a backfill (or its dry run) did, per tenant. The CLI, the library and the
    HTTP service all return or render this object."""

    run_id: int | None
    target: str
    dry_run: bool
    provider: str = ""
    status: str = "running"
    missing_before: int = 0
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    truncated: int = 0
    changed: int = 0  # read, embedded, then not written: the app changed or filled the row
    locked: int = 0  # left NULL: the app held the row's lock for the whole retry window
    deduplicated: int = 0
    stale_before: int = 0  # --refresh: stale and outdated-model rows when it started
    refreshed: int = 0  # --refresh: of those, rows written with a fresh vector
    batches: int = 0
    requests: int = 0
    retries: int = 0
    tokens: int = 0
    estimated_cost_usd: float = 0.0
    duration_s: float = 0.0
    would_fail: int = 0  # dry run: rows of tenants without a usable key
    deferred_indexes: list[dict[str, Any]] = field(default_factory=list)
    tenants: list[TenantReport] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)  # dry run: the first two texts
    warnings: list[str] = field(default_factory=list)  # sentences, e.g. an unknown tenant
    joined: bool = False  # this process joined a job another one started
    error_class: str | None = None  # a failed job: the error's class (its exit code)
    workers: list[dict[str, Any]] = field(default_factory=list)  # a job: each worker's part
    chunks: dict[str, int] = field(default_factory=dict)  # a job: its chunks by state

    def tenant(self, tenant: str | None) -> TenantReport:
        """The tenant's part, added when new. Found by an index, not by a scan of the
        list: with 100,000 tenants the scan made a dry run quadratic (106 s, 10k: 4 s)."""
        return tenant_part(self, self.tenants, tenant, TenantReport)

    def add_sample(self, id: Any, tenant: str | None, text: str, *, keep: int = 2) -> None:
        """Keep the first ``keep`` texts of the scan, as sent, cut for display."""
        if len(self.samples) < keep:
            cut = text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + "…"
            self.samples.append(Sample(id=id, tenant=tenant, text=cut))

    def progress(self) -> dict[str, Any]:
        """Rows done of the total, overall and per tenant (the admin API's live view)."""
        return {
            "done": self.embedded + self.skipped + self.failed,
            "total": self.missing_before + self.stale_before,  # a refresh: both
            "tenants": [
                {
                    "tenant": t.tenant,
                    "missing": t.missing,
                    "done": t.embedded + t.skipped + t.failed,
                }
                for t in self.tenants
            ],
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["estimated_cost_usd"] = round(self.estimated_cost_usd, 6)
        data["duration_s"] = round(self.duration_s, 3)
        for f in [*data["failures"], *data["samples"]]:
            f["id"] = _jsonable(f["id"])
        return data


#: how rows whose tenant is NULL are named where a tenant's name is shown (check's line,
#: the per-tenant metrics' label, the console)
NO_TENANT = "(no tenant)"


@dataclass(frozen=True)
class TenantStatus:
    tenant: str | None
    rows: int
    missing: int
    # freshness.py: a vector from other text, from another model, of unknown origin
    stale: int = 0
    outdated_model: int = 0
    unverified: int = 0
    failing: int = 0  # rows whose last try failed (and that no try wrote since)
    failing_errors: dict[str, int] = field(default_factory=dict)  # by error class


@dataclass(frozen=True)
class TargetStatus:
    name: str
    table: str
    dimensions: int
    rows: int
    missing: int
    vector_index: str | None
    tenants: tuple[TenantStatus, ...] = ()
    stale: int = 0
    outdated_model: int = 0
    unverified: int = 0
    failing: int = 0  # rows whose last try failed, for a passing cause or not
    failing_errors: dict[str, int] = field(default_factory=dict)  # by error class
    # the model the app's searches use since a cutover (migration.searched_instead):
    # the column's vectors, kept for a rollback until finalize, are counted as
    # outdated_model against it, and neither `check` nor the stale alert counts them
    cut_over_to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``status --json`` (``cut_over_to`` only while cut over)."""
        out = asdict(self) | {"tenants": [asdict(t) for t in self.tenants]}
        if out["cut_over_to"] is None:
            del out["cut_over_to"]
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)
