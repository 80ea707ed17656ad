"""What a job is: its kind, the physical column it fills, and the fingerprint of
everything that decides the vectors it writes. No I/O.

A job's spec is recorded with it (``embedfill.runs.kind`` and ``spec``) when it is
created. A worker resolves the job's target from its own configuration and works on the
job's chunks only when that resolution has the job's fingerprint; otherwise it refuses
the job, naming the first setting that differs (``JobSpec.differs``). So a worker started
with another model, another template or another key source never writes its own vectors
into a job's column.

A kind says how a job behaves, not what the engine does: the engine and the worker read
only these flags, so a new kind (a model migration, a batch job) is one more entry in
``KINDS``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import ProviderConfig, TargetConfig
from .queue import queue_for


@dataclass(frozen=True)
class JobKind:
    name: str
    refresh: bool  # re-embeds stale and outdated-model rows, not only NULL ones
    open_ended: bool  # has no last chunk: ends only when stopped (a watch)
    joinable: bool  # a backfill of the column joins it instead of being refused
    ends: str = "wait for it to finish or cancel it"  # what a refused start is told
    idle_close_s: float = 2.0  # a worker keeps its session of the job open this long idle
    # a provider that rejects every request or answers vectors of another size fails
    # the batch's rows for a later try (its incident passes), rather than ending the job
    # (left running, a watch must outlive it; a backfill has someone to tell)
    outlives_provider_faults: bool = False


KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        JobKind("backfill", refresh=False, open_ended=False, joinable=True),
        JobKind("refresh", refresh=True, open_ended=False, joinable=True),
        # chunks come now and then: a worker keeps its session warm between them
        JobKind(
            "watch",
            refresh=True,
            open_ended=True,
            joinable=False,
            ends="it is kept filled by `embedfill watch`; stop the watch",
            idle_close_s=120.0,
            outlives_provider_faults=True,
        ),
    )
}

# The settings that decide a vector, in the order a refusal names the first that differs,
# each with the config key an operator looks for.
SETTINGS: dict[str, str] = {
    "kind": "the provider's kind",
    "model": "the provider's model",
    "dimensions": "the provider's dimensions",
    "text": "the target's text template",
    "text_sql": "the target's text_sql",
    "max_input_tokens": "the provider's max_input_tokens (truncation)",
    "id_column": "the target's id_column",
    "tenant_column": "the target's tenant_column",
    "tenant_key_sql": "the target's tenant_key_sql",
    "allow_platform_fallback": "the target's allow_platform_fallback",
    "api_key_env": "the provider's api_key_env",
}


def vector_settings(target: TargetConfig, provider: ProviderConfig) -> dict[str, Any]:
    """Everything that decides the vector a row gets, from the configuration alone: the
    model (kind, model, the dimensions asked for, else the model's known size), the text
    (template or ``text_sql``, truncation) and where tenant keys come from. Names of
    things only, never a key; the SQL settings as a digest (a query may carry a
    passphrase, and the spec is stored where every reader of the jobs sees it). A side
    table's text is its live rows' (``in_side_table``)."""
    source = target.side_of or target
    return {
        "kind": provider.kind,
        "model": provider.model,
        "dimensions": provider.expected_dimensions,
        "text": source.text,
        "text_sql": _digest(source.text_sql),
        "max_input_tokens": provider.input_token_limit,
        "id_column": target.id_column,
        "tenant_column": target.tenant_column,
        "tenant_key_sql": _digest(target.tenant_key_sql),
        "allow_platform_fallback": target.allow_platform_fallback,
        "api_key_env": provider.api_key_env,
    }


def _digest(text: str | None) -> str | None:
    return None if text is None else "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A short digest of ``settings`` (stable across processes and versions)."""
    canonical = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class JobSpec:
    """A job's identity: what kind it is, which column it fills, with what."""

    kind: str
    target: str  # the target's name in the creator's config
    table_oid: int
    column: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    # whether the creator had the provider's platform key: a worker without one would
    # fail rows the job's creator could embed, so it refuses the job instead
    platform_key: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown job kind {self.kind!r}")

    @property
    def behaviour(self) -> JobKind:
        return KINDS[self.kind]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.settings)

    @property
    def queue(self) -> str:
        """The queue its chunks are rung in (jobs/queue.py)."""
        fingerprint = self.fingerprint if self.settings else None
        return queue_for(self.target, fingerprint, self.platform_key)

    @property
    def provider_label(self) -> str:
        """The provider as reports name it (``kind:model``)."""
        return f"{self.settings.get('kind')}:{self.settings.get('model')}"

    def differs(self, mine: Mapping[str, Any], *, platform_key: bool) -> str | None:
        """The first setting in which a worker's resolution (``mine``) differs from the
        job's; None when the worker may work on the job."""
        if not self.settings:  # a job from before specs: nothing to compare
            return None
        for name in SETTINGS:
            if self.settings.get(name) != mine.get(name):
                return name
        if self.platform_key and not platform_key:
            return "api_key_env"
        return None

    def refusal_detail(self, setting: str, mine: Mapping[str, Any]) -> str:
        """The difference in a few words: "the provider's model 'a' (here: 'b')"."""
        what = SETTINGS.get(setting, setting)
        if setting == "api_key_env" and self.settings.get(setting) == mine.get(setting):
            return f"the platform key {mine.get(setting)} (not set here)"
        return f"{what} {self.settings.get(setting)!r} (here: {mine.get(setting)!r})"

    def refusal(self, setting: str, mine: Mapping[str, Any], job_id: int) -> str:
        """One sentence: why a worker leaves this job to others."""
        return (
            f"job {job_id} ({self.target}) writes vectors with "
            f"{self.refusal_detail(setting, mine)}; leaving its chunks to workers "
            "configured like the job's creator."
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "table_oid": self.table_oid,
            "column": self.column,
            "settings": dict(self.settings),
            "fingerprint": self.fingerprint,
            "platform_key": self.platform_key,
        }

    @classmethod
    def from_record(cls, state: Mapping[str, Any]) -> JobSpec:
        """A job's spec from its row of ``embedfill.runs`` (a job from before specs has
        its kind from its parameters and no settings)."""
        spec = state.get("spec") or {}
        kind = state.get("kind") or _legacy_kind(state.get("parameters") or {})
        return cls(
            kind=kind,
            target=str(spec.get("target") or state["target"]),
            table_oid=int(spec.get("table_oid") or state["table_oid"] or 0),
            column=str(spec.get("column") or state["column_name"] or ""),
            settings=dict(spec.get("settings") or {}),
            platform_key=bool(spec.get("platform_key")),
        )


def _legacy_kind(parameters: Mapping[str, Any]) -> str:
    if parameters.get("watch"):
        return "watch"
    return "refresh" if parameters.get("refresh") else "backfill"
