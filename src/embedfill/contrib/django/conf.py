"""The Django settings -> embedfill's Config and Database.

- ``settings.EMBEDFILL``: the TOML file's structure as a dict (``providers``,
  ``targets``, ``engine``), or ``settings.EMBEDFILL_CONFIG``: a TOML file's path.
- ``settings.EMBEDFILL_DATABASE``: the ``DATABASES`` alias embedfill connects with
  (``"default"`` when unset). The connection settings are Django's (under ``manage.py
  test``, the test database), never ``DATABASE_URL``.
- A target may name a model field instead of a table: ``model = "app_label.ModelName"``,
  ``field = "embedding"``, optional ``tenant_field = "organisation"``; the table, the id
  column and the columns then come from the model's ``_meta``, and ``text`` is a
  template over field names (``{title}``; a foreign key renders its id).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg import conninfo

from ...config import Config, parse_config, parse_provider
from ...config import read_toml as config_file
from ...db.connect import Database
from ...errors import ConfigError

#: the keys a model target has instead of table, id_column, embedding_column, tenant_column
MODEL_KEYS = ("model", "field", "tenant_field")
#: their meaning, for the configuration reference (docs/gen_reference.py)
MODEL_KEY_DOCS = {
    "model": '"app_label.ModelName": the table and its primary key come from the model',
    "field": "the model's vector field (VectorField, HalfVectorField): its column is filled",
    "tenant_field": "optional: the field whose value is the row's tenant (a foreign key: its id)",
}
_MODEL_TARGET_KEYS = {
    *MODEL_KEYS,
    "name",
    "text",
    "text_sql",
    "provider",
    "tenant_key_sql",
    "allow_platform_fallback",
    # the table keys are reported as clashes (E002), not as unknown
    "table",
    "id_column",
    "embedding_column",
    "tenant_column",
}
_FIELD = re.compile(r"\{([^{}!:]*)([^{}]*)\}")

# DATABASES' OPTIONS that are not libpq's: Django's own, or the driver's
_NOT_LIBPQ = {
    "isolation_level",
    "server_side_binding",
    "pool",
    "assume_role",
    "cursor_factory",
    "prepare_threshold",
}


@dataclass(frozen=True)
class Problem:
    """Something in the settings that does not fit the models: the system check's
    error, or the ConfigError of a command."""

    message: str
    hint: str
    id: str  # embedfill.E00n


def raw_settings() -> tuple[dict[str, Any], str]:
    """The settings' config as the TOML's structure, and where it came from."""
    from django.conf import settings

    inline = getattr(settings, "EMBEDFILL", None)
    path = getattr(settings, "EMBEDFILL_CONFIG", None)
    if inline is not None and path is not None:
        raise ConfigError(
            "Both settings.EMBEDFILL and settings.EMBEDFILL_CONFIG are set; keep one of them."
        )
    if inline is not None:
        if not isinstance(inline, Mapping):
            raise ConfigError(
                "settings.EMBEDFILL must be a dict with the TOML file's structure "
                "(providers, targets, engine)."
            )
        return dict(inline), "settings.EMBEDFILL"
    if path is None:
        raise ConfigError(
            "embedfill has no configuration: set settings.EMBEDFILL (a dict with the TOML "
            "file's structure) or settings.EMBEDFILL_CONFIG (a TOML file's path)."
        )
    return read_toml(config_path(Path(path))), str(path)


def config_path(path: Path) -> Path:
    """A relative ``EMBEDFILL_CONFIG`` is relative to ``settings.BASE_DIR`` when the
    project has one (as Django's own settings template does), so that manage.py run from
    another directory (cron, systemd) finds the same file; else to the current one."""
    from django.conf import settings

    base = getattr(settings, "BASE_DIR", None)
    if path.is_absolute() or base is None:
        return path
    return Path(base) / path


def read_toml(path: Path) -> dict[str, Any]:
    return config_file(path, "fix settings.EMBEDFILL_CONFIG (or --config)")


def resolve_models(
    data: Mapping[str, Any], registry: Any = None
) -> tuple[dict[str, Any], list[Problem]]:
    """``data`` with each model target turned into a table target, and what did not fit.
    A target that does not fit is left out of the result. ``registry``: the apps to find
    the models in (a migration's historical state; default: the installed apps)."""
    out = dict(data)
    targets = data.get("targets")
    if isinstance(targets, tuple):  # a Python setting: a tuple is as good as a list
        targets = list(targets)
        out["targets"] = targets
    if not isinstance(targets, list):
        return out, []
    problems: list[Problem] = []
    resolved: list[Any] = []
    for index, target in enumerate(targets):
        if isinstance(target, Mapping) and any(k in target for k in MODEL_KEYS):
            table, found = _model_target(index, target, data.get("providers"), registry)
            problems += found
            if table is not None:
                resolved.append(table)
        else:
            resolved.append(target)
    out["targets"] = resolved
    return out, problems


def _model_target(
    index: int, target: Mapping[str, Any], providers: object, registry: Any = None
) -> tuple[dict[str, Any] | None, list[Problem]]:
    from django.apps import apps as installed
    from django.core.exceptions import FieldDoesNotExist

    apps = registry or installed
    where = (
        f"target {target['name']!r}"
        if isinstance(target.get("name"), str)
        else (f"targets[{index}]")
    )
    clash = [k for k in ("table", "id_column", "embedding_column", "tenant_column") if k in target]
    if clash:
        return None, [
            Problem(
                f"The {where} names a model and also {', '.join(clash)}.",
                "A model target takes its table and columns from the model: remove "
                + ", ".join(clash)
                + ".",
                "embedfill.E002",
            )
        ]
    label, field_name = target.get("model"), target.get("field")
    if not isinstance(label, str) or not isinstance(field_name, str) or not field_name:
        return None, [
            Problem(
                f'The {where} needs model = "app_label.ModelName" and field = "...".',
                'Name the model and its vector field, e.g. model = "docs.Document", '
                'field = "embedding".',
                "embedfill.E002",
            )
        ]
    try:
        model = apps.get_model(label)
    except (LookupError, ValueError):
        return None, [
            Problem(
                f"The {where} names model {label!r}, which is not installed.",
                'Use "app_label.ModelName" of a model in INSTALLED_APPS.',
                "embedfill.E003",
            )
        ]
    opts = model._meta
    problems: list[Problem] = []
    unknown = sorted(set(target) - _MODEL_TARGET_KEYS)
    if unknown:
        problems.append(
            Problem(
                f"The {where} has unknown key {unknown[0]!r}.",
                "A model target takes: " + ", ".join(sorted(_MODEL_TARGET_KEYS)) + ".",
                "embedfill.E002",
            )
        )
    own = opts.local_concrete_fields  # the columns of this model's own table
    names = ", ".join(f.name for f in own)
    if opts.pk is None or getattr(opts.pk, "column", None) is None:
        return None, [
            Problem(
                f"The {where} names {label}, whose primary key spans several columns.",
                "embedfill names each row by one column: give the model a single-column "
                "primary key, or a unique column and a table target with id_column.",
                "embedfill.E003",
            )
        ]

    def field(name: str, role: str) -> Any:
        try:
            found = opts.get_field(name)
        except FieldDoesNotExist:
            problems.append(
                Problem(
                    f"The {where} names {role} {name!r}, which {label} does not have.",
                    f"Use one of {label}'s fields: {names}.",
                    "embedfill.E004",
                )
            )
            return None
        if not getattr(found, "concrete", False) or getattr(found, "many_to_many", False):
            problems.append(
                Problem(
                    f"The {where} names {role} {name!r}, a relation of {label} with no "
                    "column in its table.",
                    f"Use one of {label}'s own fields: {names}.",
                    "embedfill.E004",
                )
            )
            return None
        if found not in own:
            problems.append(
                Problem(
                    f"The {where} names {role} {name!r}, which lives in the table of "
                    f"{found.model._meta.label}, a parent of {label}.",
                    f"embedfill fills one table: use {label}'s own fields ({names}), or make "
                    f"the target {found.model._meta.label}.",
                    "embedfill.E004",
                )
            )
            return None
        return found

    vector = field(field_name, "field")
    tenant_name = target.get("tenant_field")
    tenant = field(tenant_name, "tenant_field") if tenant_name else None
    columns = {f.name: f.column for f in own}
    columns.update({f.attname: f.column for f in own})
    text = target.get("text")
    if isinstance(text, str):
        for name in _template_fields(text):
            if name not in columns:
                problems.append(
                    Problem(
                        f"The text of {where} names {{{name}}}, which {label} does not have.",
                        f"Use {label}'s field names in the template: {names}.",
                        "embedfill.E004",
                    )
                )
    if vector is not None:
        problems += _check_vector(where, label, vector, target, providers)
    if problems:
        return None, problems
    table = {k: v for k, v in target.items() if k not in MODEL_KEYS}
    table.setdefault("name", opts.db_table)
    table["table"] = opts.db_table
    table["id_column"] = opts.pk.column
    table["embedding_column"] = vector.column
    if tenant is not None:
        table["tenant_column"] = tenant.column
    if isinstance(text, str):
        table["text"] = _FIELD.sub(
            lambda m: "{" + columns[m.group(1)] + m.group(2) + "}" if m.group(1) else m.group(0),
            text,
        )
    return table, []


def _template_fields(template: str) -> list[str]:
    plain = template.replace("{{", "").replace("}}", "")
    return [m.group(1) for m in _FIELD.finditer(plain) if m.group(1)]


def _check_vector(
    where: str, label: str, field: Any, target: Mapping[str, Any], providers: object
) -> list[Problem]:
    kind = _vector_type(field)
    name = f"{label}.{field.name}"
    if kind is None:
        return [
            Problem(
                f"The {where} names {name}, which is not a vector field.",
                "Use a pgvector field (pgvector.django.VectorField or HalfVectorField).",
                "embedfill.E005",
            )
        ]
    size = kind[1]
    provider = providers.get(target.get("provider")) if isinstance(providers, Mapping) else None
    wanted = _provider_dimensions(provider) if isinstance(provider, Mapping) else None
    if size is not None and wanted is not None and size != wanted:
        return [
            Problem(
                f"{name} holds {kind[0]}({size}), but provider {target.get('provider')!r} "
                f"gives {wanted} dimensions.",
                f"Make the field {kind[0]}({wanted}) (a migration), or set the provider's "
                f"dimensions = {size} if its model can give that size.",
                "embedfill.E006",
            )
        ]
    return []


def _vector_type(field: Any) -> tuple[str, int | None] | None:
    from django.db import connection

    try:
        db_type = field.db_type(connection)
    except Exception:  # a field that needs more than a connection to say its type
        return None
    match = re.fullmatch(r"(vector|halfvec)(?:\((\d+)\))?", str(db_type or "").strip())
    if match is None:
        return None
    return match.group(1), int(match.group(2)) if match.group(2) else None


def _provider_dimensions(provider: Mapping[str, Any]) -> int | None:
    try:
        return parse_provider("check", provider).expected_dimensions
    except ConfigError:
        return None


def settings_config(registry: Any = None) -> Config:
    """The Config of ``settings.EMBEDFILL`` or ``settings.EMBEDFILL_CONFIG``; a model
    target that does not fit its model is a ConfigError naming the field. ``registry``:
    the apps to resolve model targets in (a migration's historical state)."""
    data, source = raw_settings()
    return _config(data, source, registry)


def path_config(path: Path) -> Config:
    """``--config PATH`` under ``manage.py``: model targets resolve there too."""
    return _config(read_toml(path), str(path))


def _config(data: Mapping[str, Any], source: str, registry: Any = None) -> Config:
    resolved, problems = resolve_models(data, registry)
    if problems:
        first = problems[0]
        raise ConfigError(f"{first.message} {first.hint}")
    return parse_config(resolved, source=source)


def alias() -> str:
    from django.conf import settings

    name = getattr(settings, "EMBEDFILL_DATABASE", None)
    if name is None:
        return "default"
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"settings.EMBEDFILL_DATABASE is {name!r}; it must be the name of a DATABASES alias."
        )
    return name


def database(using: str | None = None) -> Database:
    """The Database of the ``DATABASES`` alias ``using`` (else EMBEDFILL_DATABASE, else
    ``default``), from Django's connection settings: under ``manage.py test``, the test
    database."""
    from django.db import connections
    from django.utils.connection import ConnectionDoesNotExist

    name = using or alias()
    try:
        settings = connections[name].settings_dict
    except ConnectionDoesNotExist as exc:
        raise ConfigError(
            f"settings.EMBEDFILL_DATABASE names {name!r}, which is not in DATABASES; "
            "name one of its aliases."
        ) from exc
    return Database(
        url=url_of(settings, name),
        prepare=prepares(settings),
        source=f"DATABASES[{name!r}] in the Django settings",
    )


def prepares(settings: Mapping[str, Any]) -> bool:
    """Whether the server may keep prepared statements: not behind a pooler in
    transaction mode, which Django is told of by DISABLE_SERVER_SIDE_CURSORS, or by
    OPTIONS' prepare_threshold = None (psycopg 3)."""
    options = settings.get("OPTIONS") or {}
    if settings.get("DISABLE_SERVER_SIDE_CURSORS"):
        return False
    return not ("prepare_threshold" in options and options["prepare_threshold"] is None)


def url_of(settings: Mapping[str, Any], name: str) -> str:
    """A libpq connection string from one ``DATABASES`` entry."""
    engine = str(settings.get("ENGINE") or "")
    if "postgresql" not in engine and "postgis" not in engine:
        raise ConfigError(
            f"DATABASES[{name!r}] uses {engine or 'no ENGINE'}; embedfill needs PostgreSQL "
            "(django.db.backends.postgresql): set EMBEDFILL_DATABASE to such an alias."
        )
    params: dict[str, Any] = {}
    options = settings.get("OPTIONS") or {}
    for key, value in options.items():
        if key not in _NOT_LIBPQ and value is not None and not isinstance(value, dict | bool):
            params[key] = value
    for key, param in (
        ("NAME", "dbname"),
        ("USER", "user"),
        ("PASSWORD", "password"),
        ("HOST", "host"),
        ("PORT", "port"),
    ):
        value = settings.get(key)
        if value not in (None, ""):
            params[param] = str(value)
    if "service" not in params and "dbname" not in params:
        raise ConfigError(f"DATABASES[{name!r}] has no NAME; embedfill needs the database's name.")
    return conninfo.make_conninfo("", **params)
