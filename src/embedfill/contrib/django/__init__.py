"""embedfill in a Django project: ``INSTALLED_APPS += ["embedfill.contrib.django"]``.

- ``settings.EMBEDFILL`` (the TOML's structure as a dict) or ``settings.EMBEDFILL_CONFIG``
  (a TOML file's path); ``settings.EMBEDFILL_DATABASE``, the ``DATABASES`` alias to use.
  A target may name ``model = "app_label.ModelName"`` and ``field = "embedding"``.
- ``python manage.py embedfill <command> ...``: every CLI command, same flags, output
  and exit codes.
- ``operations.InstallEmbedfillTriggers(target=...)`` and ``RemoveEmbedfillTriggers``:
  migration operations, each the other's reverse.
- ``manage.py check`` validates the targets against the models.
- In code (a data migration, a task): ``embedfill.backfill(config(), target="...",
  database=database())``.
"""

from __future__ import annotations

from typing import Any

from ...config import Config
from ...db.connect import Database
from .conf import database, settings_config


def config(apps: Any = None) -> Config:
    """The embedfill Config of the Django settings, model targets resolved in ``apps``:
    in a data migration, pass the ``apps`` RunPython gives (the models as that migration
    sees them: a later migration may rename the table); else the installed apps."""
    return settings_config(apps)


__all__ = ["Config", "Database", "config", "database"]
