"""``manage.py check``: the embedfill settings against the models, with no query."""

from __future__ import annotations

from typing import Any

from django.core import checks

from ...config import parse_config
from ...errors import ConfigError
from .conf import database, raw_settings, resolve_models


def check_targets(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """An error per target that does not fit its model (a missing field, a field that is
    no vector, a vector of another size than the provider's), and for settings that
    embedfill cannot read."""
    from django.conf import settings

    if (
        getattr(settings, "EMBEDFILL", None) is None
        and getattr(settings, "EMBEDFILL_CONFIG", None) is None
    ):
        return [
            checks.Warning(
                "embedfill is installed but has no configuration.",
                hint="Set settings.EMBEDFILL (a dict with the TOML file's structure) or "
                "settings.EMBEDFILL_CONFIG (a TOML file's path).",
                id="embedfill.W001",
            )
        ]
    try:
        data, source = raw_settings()
    except ConfigError as exc:
        return [checks.Error(str(exc), id="embedfill.E001")]
    resolved, problems = resolve_models(data)
    errors: list[checks.CheckMessage] = [
        checks.Error(p.message, hint=p.hint, id=p.id) for p in problems
    ]
    if not problems:
        try:
            parse_config(resolved, source=source)
        except ConfigError as exc:
            errors.append(
                checks.Error(
                    f"{source}: {exc}",
                    hint="See the configuration reference (docs/reference/configuration.md) "
                    "and, for model targets, docs/integrations/django.md.",
                    id="embedfill.E001",
                )
            )
    try:
        database()  # the alias exists and is PostgreSQL; nothing is connected
    except ConfigError as exc:
        errors.append(
            checks.Error(
                str(exc),
                hint="Set EMBEDFILL_DATABASE to an alias of DATABASES that uses "
                "django.db.backends.postgresql.",
                id="embedfill.E007",
            )
        )
    return errors
