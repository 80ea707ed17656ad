"""Migration operations for the change triggers (``embedfill triggers install``)::

    from embedfill.contrib.django.operations import InstallEmbedfillTriggers

    class Migration(migrations.Migration):
        dependencies = [("docs", "0001_initial")]
        operations = [InstallEmbedfillTriggers(target="docs_document")]

Each is the other's reverse. The triggers are created in the migration's transaction
(``sqlmigrate`` shows them); embedfill's schema and the column's number are made first,
on a connection of embedfill's, so the table must exist before this migration: put the
operation in a migration after the one that creates the model. A model target is read
as the migration's state has the model (a later migration may rename its table), and
DATABASE_ROUTERS decide, as for any operation, which databases it runs on.
"""

from __future__ import annotations

import asyncio
from typing import Any

from django.db.migrations.operations.base import Operation

from ... import application
from ...db import triggers
from ...db.connect import Database
from ...errors import ConfigError, ExtensionMissing, SchemaMismatch, SideTableMissing
from .conf import prepares, raw_settings, settings_config, url_of


def _run(target: str, app_label: str, schema_editor: Any, state: Any, *, install: bool) -> None:
    from django.db import router

    connection = schema_editor.connection
    model_name = _model_name(target)
    hints = {"model_name": model_name} if model_name else {}
    if not router.allow_migrate(connection.alias, app_label, **hints):
        return  # DATABASE_ROUTERS keep this app off this database
    settings = connection.settings_dict
    db = Database(
        url=url_of(settings, connection.alias),
        prepare=prepares(settings),
        source=f"DATABASES[{connection.alias!r}] in the Django settings",
    )
    # the models as this migration sees them (a later migration may rename the table)
    config = settings_config(getattr(state, "apps", None))
    dry = bool(getattr(schema_editor, "collect_sql", False))  # sqlmigrate: change nothing
    verb = "Install" if install else "Remove"
    try:
        plan, _ = asyncio.run(
            application.atriggers(config, db, target, install, print_sql=dry, apply=False)
        )
    except SideTableMissing as exc:
        # its vectors are in a side table (embedding_table), which only a change of model
        # makes: a fresh database (a test run, a new environment) has none, and nothing
        # to trigger for; where it has one, the finalize moved them there
        if dry:
            schema_editor.execute(
                f"-- embedfill: {exc} {verb}EmbedfillTriggers does nothing here",
                params=None,
            )
        return
    except (SchemaMismatch, ExtensionMissing) as exc:
        if dry:
            schema_editor.execute(
                f"-- embedfill: {exc} The triggers' SQL shows once the table exists "
                "(migrate up to the migration that creates it first)",
                params=None,
            )
            return
        raise type(exc)(
            f"{exc} If this migration (or one squashed with it) creates the table or the "
            f"vector extension, move {verb}EmbedfillTriggers to a migration of its own after "
            "it: embedfill reads the catalog on a connection of its own, which sees only "
            "what is committed."
        ) from exc
    if dry:
        for note in plan.notes:
            schema_editor.execute(f"-- {note}", params=None)
        schema_editor.execute(
            "-- embedfill's own schema (the queue table) is made by `manage.py migrate` "
            "itself, or `manage.py embedfill migrate`",
            params=None,
        )
    for statement in plan.statements:
        text = statement.as_string(None)
        if plan.column_id is None:
            text = text.replace(str(triggers.UNNUMBERED), "N")
        schema_editor.execute(text, params=None)


def _model_name(target: str) -> str | None:
    """The model a model target names (for the routers), else None."""
    try:
        data, _ = raw_settings()
    except ConfigError:
        return None
    for raw in data.get("targets") or ():
        if isinstance(raw, dict) and raw.get("name", None) in (target, None):
            label = raw.get("model")
            if isinstance(label, str) and "." in label:
                return label.rsplit(".", 1)[1].lower()
    return None


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
        _run(self.target, app_label, schema_editor, to_state, install=self.install)

    def database_backwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        _run(self.target, app_label, schema_editor, to_state, install=not self.install)

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
