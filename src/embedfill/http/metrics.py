"""Prometheus metrics for the admin service, fed by the engine's Observer hooks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..application import Observer
from ..health import RunningJobs
from ..models import NO_TENANT, TargetStatus


class Metrics(Observer):
    def __init__(self, *, service: bool = True, tenant_labels: bool = False) -> None:
        """``service``: the admin service's, with the gauges read from the database; a
        worker's or watch's own (``--metrics-port``) has only what its process counts
        (they were exported there too, never set: `embedfill_workers_alive 0` beside a
        live worker). ``tenant_labels`` (``EMBEDFILL_METRICS_TENANT_LABELS=1``): the row
        gauges per tenant too, as ``embedfill_tenant_*_rows{target, tenant}`` (one series
        per tenant: off by default, for the cardinality)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self._tenants: dict[str, set[str]] = {}  # per target, the tenants shown now
        # per labelled gauge and target, the error classes it shows now (see _by_class)
        self._classes: dict[tuple[Gauge, str], set[str]] = {}
        g = r if service else None  # the database's gauges: the service's only
        self.rows_total = Counter(
            "embedfill_rows", "Rows by outcome.", ["target", "outcome"], registry=r
        )
        self.requests_total = Counter(
            "embedfill_provider_requests",
            "Embedding requests by HTTP status.",
            ["target", "status"],
            registry=r,
        )
        self.retries_total = Counter(
            "embedfill_provider_retries",
            "Embedding requests that failed and were retried or given up, by status.",
            ["target", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "embedfill_provider_latency_seconds",
            "Embedding request latency.",
            ["target"],
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.tokens_total = Counter(
            "embedfill_tokens", "Tokens sent in successful requests.", ["target"], registry=r
        )
        self.jobs_total = Counter(
            "embedfill_jobs", "Jobs finished, by final state.", ["state"], registry=r
        )
        self.jobs_running = Gauge(
            "embedfill_jobs_running", "Jobs running in this process.", registry=g
        )
        # the status gauges: one status pass per target, at most every metrics_interval_s
        # (service.py), never one per scrape
        self.missing = Gauge(
            "embedfill_missing_rows", "Rows whose embedding is NULL.", ["target"], registry=g
        )
        self.failing = Gauge(
            "embedfill_failing_rows",
            "Rows whose last try failed and that no try wrote since, by error class (a "
            "watch retries passing causes with a backoff, at once after a key change).",
            ["target", "error_class"],
            registry=g,
        )
        self.target_errors = Gauge(
            "embedfill_target_error",
            "1 while the target cannot be read, by the error's class (its table gone, or "
            "changed so that it no longer fits: a watch stops watching it); else 0.",
            ["target", "error_class"],
            registry=r,  # a watch's own too: it knows when it stops watching a target
        )
        self.stale = Gauge(
            "embedfill_stale_rows",
            "Vectors whose row's text changed since they were embedded.",
            ["target"],
            registry=g,
        )
        self.outdated_model = Gauge(
            "embedfill_outdated_model_rows",
            "Vectors embedded with another provider, model or dimensions than configured now.",
            ["target"],
            registry=g,
        )
        self.cut_over = Gauge(
            "embedfill_model_cut_over",
            "1 while a change of model of the target is cut over and not finalized: its "
            "outdated-model vectors are the column's, kept for a rollback.",
            ["target"],
            registry=g,
        )
        self.unverified = Gauge(
            "embedfill_unverified_rows",
            "Vectors embedfill has no provenance for (written by other code).",
            ["target"],
            registry=g,
        )
        # per tenant, when asked: what the per-target gauges above count, by tenant
        # (NO_TENANT for rows whose tenant is NULL; "" is a tenant of its own)
        self.tenant_rows: dict[str, Gauge] = {}
        if tenant_labels and g is not None:
            for field, what in (
                ("missing", "Rows whose embedding is NULL"),
                ("stale", "Vectors whose row's text changed since they were embedded"),
                ("outdated_model", "Vectors embedded with another model than configured now"),
                ("unverified", "Vectors embedfill has no provenance for"),
                ("failing", "Rows whose last try failed and that no try wrote since"),
            ):
                self.tenant_rows[field] = Gauge(
                    f"embedfill_tenant_{field}_rows",
                    f"{what}, per tenant (EMBEDFILL_METRICS_TENANT_LABELS=1).",
                    ["target", "tenant"],
                    registry=g,
                )
        self.status_at = Gauge(
            "embedfill_status_timestamp_seconds",
            "When the status gauges of the target were last refreshed (Unix time).",
            ["target"],
            registry=g,
        )
        self.status_pass = Gauge(
            "embedfill_status_pass_seconds",
            "How long the last status pass over every target took.",
            registry=g,
        )
        # jobs not over yet, from embedfill.runs: every worker's, not only this process's
        self.job_running = Gauge(
            "embedfill_job_running_seconds",
            "Age of the target's oldest job not over yet (absent: no such job).",
            ["target"],
            registry=g,
        )
        self.job_silent = Gauge(
            "embedfill_job_heartbeat_age_seconds",
            "Seconds since a worker last reported on the target's most silent job not over.",
            ["target"],
            registry=g,
        )
        self.job_queued = Gauge(
            "embedfill_job_chunks_queued",
            "Chunks of the target's jobs waiting for a worker or in one's hands (0: an idle "
            "watch, nothing to do).",
            ["target"],
            registry=g,
        )
        self.workers_alive = Gauge(
            "embedfill_workers_alive",
            "Worker processes connected to the database now (any target).",
            registry=g,
        )
        self.job_done = Gauge(
            "embedfill_job_rows_done",
            "Rows embedded, skipped or failed so far by the target's jobs not over (flat: "
            "no progress).",
            ["target"],
            registry=g,
        )

    def request(self, target: str, outcome: str, seconds: float) -> None:
        self.requests_total.labels(target, outcome).inc()
        self.latency.labels(target).observe(seconds)
        if outcome != "200":
            self.retries_total.labels(target, outcome).inc()

    def rows(self, target: str, outcome: str, count: int) -> None:
        if count:
            self.rows_total.labels(target, outcome).inc(count)

    def tokens(self, target: str, count: int) -> None:
        self.tokens_total.labels(target).inc(count)

    def set_status(self, status: TargetStatus, at: float) -> None:
        name = status.name
        if self.tenant_rows:
            self._set_tenants(status)
        self.missing.labels(name).set(status.missing)
        self._by_class(self.failing, name, status.failing_errors)
        self.stale.labels(name).set(status.stale)
        self.outdated_model.labels(name).set(status.outdated_model)
        self.cut_over.labels(name).set(1 if status.cut_over_to is not None else 0)
        self.unverified.labels(name).set(status.unverified)
        self.status_at.labels(name).set(at)

    def _set_tenants(self, status: TargetStatus) -> None:
        """Each tenant's row gauges; a tenant gone since the last pass is removed."""
        name = status.name
        now = {_tenant_label(t.tenant) for t in status.tenants}
        for tenant in self._tenants.get(name, set()) - now:
            for gauge in self.tenant_rows.values():
                gauge.remove(name, tenant)
        for t in status.tenants:
            tenant = _tenant_label(t.tenant)
            for field, gauge in self.tenant_rows.items():
                gauge.labels(name, tenant).set(getattr(t, field))
        self._tenants[name] = now

    def target_error(self, target: str, error_class: str | None) -> None:
        self.set_target_error(target, error_class)

    def set_target_error(self, target: str, error_class: str | None) -> None:
        """The target read fine (None), or failed with this class of error."""
        self._by_class(self.target_errors, target, {} if error_class is None else {error_class: 1})

    def _by_class(self, gauge: Gauge, target: str, values: Mapping[str, float]) -> None:
        """The target's values by error class; a class it showed before and has no value
        now goes to 0 (no alert lingers on a cause that is gone)."""
        shown = self._classes.get((gauge, target), set())
        for error_class in shown - set(values):
            gauge.labels(target, error_class).set(0)
        for error_class, value in values.items():
            gauge.labels(target, error_class).set(value)
        self._classes[(gauge, target)] = set(values)

    def set_jobs(self, running: Sequence[RunningJobs]) -> None:
        """Replace the job gauges: a target without a job not over has none."""
        for gauge in (self.job_running, self.job_silent, self.job_done, self.job_queued):
            gauge.clear()
        for job in running:
            self.job_running.labels(job.target).set(job.running_s)
            self.job_silent.labels(job.target).set(job.silent_s)
            self.job_done.labels(job.target).set(job.rows_done)
            self.job_queued.labels(job.target).set(job.chunks_queued)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _tenant_label(tenant: str | None) -> str:
    return NO_TENANT if tenant is None else tenant
