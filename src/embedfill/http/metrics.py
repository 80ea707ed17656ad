"""Prometheus metrics for the admin service, fed by the engine's Observer hooks."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..application import Observer


class Metrics(Observer):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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
            "embedfill_jobs_running", "Jobs running in this process.", registry=r
        )
        self.missing = Gauge(
            "embedfill_missing_rows",
            "Rows whose embedding is NULL (refreshed at most every 30 s).",
            ["target"],
            registry=r,
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
