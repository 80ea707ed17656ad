"""The Django app: its label is ``embedfill``; ready() registers the system check."""

from __future__ import annotations

from django.apps import AppConfig


class EmbedfillConfig(AppConfig):
    name = "embedfill.contrib.django"
    label = "embedfill"
    verbose_name = "embedfill"

    def ready(self) -> None:
        from django.core import checks

        from .checks import check_targets

        checks.register(check_targets)
