"""One error tree for embedfill.

Each class's docstring is its default message. The CLI prints ``str(error)`` and exits
with ``exit_code``; the HTTP service maps the same classes to statuses. Messages never
carry secrets: they name tenants, targets and columns, never key material.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a pure value type; providers/limits.py imports nothing of ours
    from .providers.limits import RateSignals


class EmbedfillError(Exception):
    """Something went wrong in embedfill."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(EmbedfillError):
    """The configuration is not valid."""

    exit_code = 2


class UsageError(EmbedfillError):
    """The command was given arguments it cannot use."""

    exit_code = 2


class TargetNotFound(ConfigError):
    """No target of that name is configured."""


class SchemaMismatch(ConfigError):
    """The table does not match the target's configuration."""


class ExtensionMissing(ConfigError):
    """The pgvector extension is not installed in this database."""


class KeyStoreError(ConfigError):
    """The key store cannot be used as configured."""


class SchemaNotReady(ConfigError):
    """embedfill's own schema is missing or behind this build; run `embedfill migrate`."""


class ProviderMisconfigured(ConfigError):
    """The provider rejects every request; check its model and dimensions."""


class DatabaseError(EmbedfillError):
    """The database could not be reached or refused a statement."""


class NoFreeConnection(DatabaseError):
    """The database server has no free connection; raise max_connections or use fewer."""


class RunAborted(EmbedfillError):
    """The run stopped early; the rows written before are kept, the rest stay NULL."""

    exit_code = 3


class TargetBusy(EmbedfillError):
    """Another run is already backfilling this target."""

    exit_code = 4

    def __init__(self, message: str | None = None, *, run_id: int | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


class ProviderError(EmbedfillError):
    """The embedding provider failed."""

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
        self.signals: RateSignals | None = None  # what the answer said of the key's limits


class RateLimited(ProviderError):
    """The provider is rate limiting this key (HTTP 429)."""

    transient = True


class ProviderUnavailable(ProviderError):
    """The provider did not answer in time or answered with a server error."""

    transient = True


class AuthFailed(ProviderError):
    """The provider rejected the API key (HTTP 401/403)."""


class BadInput(ProviderError):
    """The provider rejected an input of this batch (HTTP 400)."""


class NoApiKey(ProviderError):
    """No API key is available for this tenant."""


class BadAnswer(ProviderError):
    """The provider's answer was malformed."""

    transient = True  # a proxy or provider glitch: asking again usually gets a good one


class NonFiniteVector(ProviderError):
    """The provider returned a vector with NaN or infinite values for this row."""
