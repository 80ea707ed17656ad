"""One error tree for embedfill.

Each class's docstring is its default message, and each class declares, side by side,
the CLI's ``exit_code`` and the admin service's ``http_status`` for it: the CLI prints
``str(error)`` and exits with ``exit_code``; the HTTP service answers ``{"error": ...}``
with ``http_status``. A subclass declares both itself, even where they equal its
parent's, so this file reads as the whole table (tests/unit/test_errors.py pins it).
Messages never carry secrets: they name tenants, targets and columns, never key material.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a pure value type; providers/limits.py imports nothing of ours
    from .providers.limits import RateSignals


class EmbedfillError(Exception):
    """Something went wrong in embedfill."""

    exit_code = 1
    http_status = 500

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(EmbedfillError):
    """The configuration is not valid."""

    exit_code = 2
    http_status = 503  # the service's own configuration, not the request


class UsageError(EmbedfillError):
    """The command was given arguments it cannot use."""

    exit_code = 2
    http_status = 422


class TargetNotFound(ConfigError):
    """No target of that name is configured."""

    exit_code = 2
    http_status = 404


class SchemaMismatch(ConfigError):
    """The table does not match the target's configuration."""

    exit_code = 2
    http_status = 503


class SideTableMissing(SchemaMismatch):
    """The side table a target names (``embedding_table``) does not exist: only a change
    of model makes one, so a fresh database has none."""

    exit_code = 2
    http_status = 503


class ExtensionMissing(ConfigError):
    """The pgvector extension is not installed in this database."""

    exit_code = 2
    http_status = 503


class RowSecurityHides(ConfigError):
    """Row-level security on the table hides rows from embedfill's role; make the role
    BYPASSRLS (or the table's owner, without FORCE ROW LEVEL SECURITY)."""

    exit_code = 2
    http_status = 503


class ModelChanged(ConfigError):
    """The configured model differs from the one that wrote the column's vectors; refresh
    deliberately (`backfill --refresh`), or pass --allow-model-change."""

    exit_code = 2
    http_status = 503


class PlanRefused(ConfigError):
    """A change of model that cannot work as asked (`embedfill model plan`); the message
    says what to change in the config."""

    exit_code = 2
    http_status = 422


class KeyStoreError(ConfigError):
    """The key store cannot be used as configured."""

    exit_code = 2
    http_status = 503


class SchemaNotReady(ConfigError):
    """embedfill's own schema is missing or behind this build; run `embedfill migrate`."""

    exit_code = 2
    http_status = 503


class ProviderMisconfigured(ConfigError):
    """The provider rejects every request; check its model and dimensions."""

    exit_code = 2
    http_status = 503


class PrivilegeMissing(EmbedfillError):
    """The database role may not do this; run it as a role that may, or grant what it needs."""

    exit_code = 5
    http_status = 403


class DatabaseError(EmbedfillError):
    """The database could not be reached or refused a statement."""

    exit_code = 1
    http_status = 503  # the service's own database, not the request


class WriteRefused(DatabaseError):
    """The database refused to write a row's vector, whatever the retries (a constraint,
    a trigger, a privilege); the row fails, the others are written."""

    exit_code = 3
    http_status = 500


class NoFreeConnection(DatabaseError):
    """The database server has no free connection; raise max_connections or use fewer."""

    exit_code = 1
    http_status = 503


class RunAborted(EmbedfillError):
    """The run stopped early; the rows written before are kept, the rest stay NULL."""

    exit_code = 3
    http_status = 500


class VerificationFailed(EmbedfillError):
    """Stored vectors disagree with what the provider makes of their rows' text now."""

    exit_code = 3
    http_status = 409

    def __init__(
        self, message: str | None = None, *, details: dict[str, object] | None = None
    ) -> None:
        super().__init__(message)
        self.details = details  # what was checked, as JSON (AdoptResult.to_dict)


class TargetBusy(EmbedfillError):
    """Another run is already backfilling this target."""

    exit_code = 4
    http_status = 409

    def __init__(self, message: str | None = None, *, run_id: int | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


class JobConflict(EmbedfillError):
    """A backfill of this target is already running."""

    exit_code = 4
    http_status = 409

    def __init__(self, message: str, job_id: int | None) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobNotFound(EmbedfillError):
    """No job has that id."""

    exit_code = 1
    http_status = 404


class NotFound(EmbedfillError):
    """There is no such record (a change of model, by its number)."""

    exit_code = 1
    http_status = 404


class ProviderError(EmbedfillError):
    """The embedding provider failed."""

    exit_code = 1
    http_status = 500  # what the service answers; ``self.status`` is what the provider did
    transient = False

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.attempts = 1  # set by the engine when it gives up
        self.sent_at: float | None = None  # monotonic: when its request was sent
        self.signals: RateSignals | None = None  # what the answer said of the key's limits


class RateLimited(ProviderError):
    """The provider is rate limiting this key (HTTP 429)."""

    exit_code = 1
    http_status = 500
    transient = True


class ProviderUnavailable(ProviderError):
    """The provider did not answer in time or answered with a server error."""

    exit_code = 1
    http_status = 500
    transient = True


class AuthFailed(ProviderError):
    """The provider rejected the API key (HTTP 401/403)."""

    exit_code = 1
    http_status = 500


class BadInput(ProviderError):
    """The provider rejected an input of this batch (HTTP 400)."""

    exit_code = 1
    http_status = 500


class ProviderRejectsAll(ProviderError):
    """The provider rejects every request for now (a 400 even for a one-word text) in a
    session whose requests it accepted before, or in a watch: a provider's incident, not
    these rows' texts. Their rows are sent again after a backoff."""

    exit_code = 1
    http_status = 500
    transient = True


class VectorsMisfit(ProviderError):
    """In a watch, the provider answered vectors of another size than the column's (a
    proxy misrouted, a model swapped): nothing of the batch is written, and its rows are
    sent again after a backoff."""

    exit_code = 1
    http_status = 500
    transient = True


class NoApiKey(ProviderError):
    """No API key is available for this tenant."""

    exit_code = 1
    http_status = 500


class BadAnswer(ProviderError):
    """The provider's answer was malformed."""

    exit_code = 1
    http_status = 500
    transient = True  # a proxy or provider glitch: asking again usually gets a good one


class NonFiniteVector(ProviderError):
    """The provider returned a vector with NaN or infinite values for this row."""

    exit_code = 1
    http_status = 500


def first_line(exc: BaseException) -> str:
    """An exception's message, its first line only (a database error's detail and hint
    lines stay in the log), or its class name when it has none."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
