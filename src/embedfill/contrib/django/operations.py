"""Migration operations for the change triggers (``embedfill triggers install``)::

    from embedfill.contrib.django.operations import InstallEmbedfillTriggers

    class Migration(migrations.Migration):
        dependencies = [("docs", "0001_initial")]
        operations = [InstallEmbedfillTriggers(target="docs_document")]

Each is the other's reverse. The triggers are created in the migration's transaction
(``sqlmigrate`` shows them); embedfill's schema and the column's number are made first,
on a connection of embedfill's, so the table must exist before this migration: put the
operation in a migration after the one that creates the model.
"""

from __future__ import annotations

import asyncio
from typing import Any

from django.db.migrations.operations.base import Operation

from ... import application
from ...db.connect import Database
from ...errors import TargetNotFound
from .conf import settings_config, url_of


def _run(schema_editor: Any, target: str, *, install: bool) -> None:
    connection = schema_editor.connection
    db = Database(url=url_of(connection.settings_dict, connection.alias))
    config = settings_config()
    dry = bool(getattr(schema_editor, "collect_sql", False))  # sqlmigrate: change nothing
    try:
        plan, _ = asyncio.run(
            application.atriggers(config, db, target, install, print_sql=dry, apply=False)
        )
    except TargetNotFound as exc:
        raise TargetNotFound(
            f"{exc} If a migration not yet committed creates it, put "
            f"{'Install' if install else 'Remove'}EmbedfillTriggers in a migration after it."
        ) from exc
    for statement in plan.statements:
        schema_editor.execute(statement.as_string(None), params=None)


class InstallEmbedfillTriggers(Operation):
    """Install the target's change triggers; reversed, remove them."""

    reversible = True
    reduces_to_sql = True
    install = True

    def __init__(self, target: str) -> None:
        self.target = target

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        return (self.__class__.__qualname__, [], {"target": self.target})

    def state_forwards(self, app_label: str, state: Any) -> None:
        pass  # the models do not change

    def database_forwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        _run(schema_editor, self.target, install=self.install)

    def database_backwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        _run(schema_editor, self.target, install=not self.install)

    def describe(self) -> str:
        verb = "Install" if self.install else "Remove"
        return f"{verb} embedfill's change triggers of target {self.target}"

    @property
    def migration_name_fragment(self) -> str:
        verb = "install" if self.install else "remove"
        return f"embedfill_{verb}_triggers_{self.target}".lower()


class RemoveEmbedfillTriggers(InstallEmbedfillTriggers):
    """Remove the target's change triggers; reversed, install them."""

    install = False


__all__ = ["InstallEmbedfillTriggers", "RemoveEmbedfillTriggers"]
