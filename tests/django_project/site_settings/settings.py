"""A Django 5 project as a user of embedfill has it: pgvector's VectorField, per-
organisation tenants, embedfill configured in settings. The tests pick the database with
EMBEDFILL_TEST_DJANGO_DB (a libpq URL) and a settings variant with
EMBEDFILL_TEST_DJANGO_VARIANT."""

import os

from psycopg import conninfo

SECRET_KEY = "test-only"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "docs", "shapes", "embedfill.contrib.django"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_db = conninfo.conninfo_to_dict(os.environ.get("EMBEDFILL_TEST_DJANGO_DB", "dbname=none"))
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db.get("dbname"),
        "USER": _db.get("user", ""),
        "PASSWORD": _db.get("password", ""),
        "HOST": _db.get("host", ""),
        "PORT": _db.get("port", ""),
    }
}

EMBEDFILL = {
    "providers": {"hash": {"kind": "hash", "model": "hash-8", "dimensions": 8}},
    "targets": [
        {
            "name": "documents",
            "model": "docs.Document",
            "field": "embedding",
            "tenant_field": "organisation",
            "text": "{title}\n\n{body}",
            "provider": "hash",
        }
    ],
}

_variant = os.environ.get("EMBEDFILL_TEST_DJANGO_VARIANT", "")
if _variant == "missing_field":
    EMBEDFILL["targets"][0]["field"] = "vector"
elif _variant == "wrong_size":
    EMBEDFILL["providers"]["hash"]["dimensions"] = 16
elif _variant == "template_field":
    EMBEDFILL["targets"][0]["text"] = "{title}\n\n{summary}"
elif _variant == "toml":
    del EMBEDFILL
    EMBEDFILL_CONFIG = os.environ["EMBEDFILL_TEST_DJANGO_TOML"]
elif _variant == "parent_field":
    EMBEDFILL["targets"][0].update(model="shapes.Article", field="embedding")
elif _variant == "composite_pk":
    EMBEDFILL["targets"][0].update(model="shapes.Chunk", text="{content}")
    del EMBEDFILL["targets"][0]["tenant_field"]
elif _variant == "bad_alias":
    EMBEDFILL_DATABASE = "nope"
elif _variant == "relative_toml":
    del EMBEDFILL
    BASE_DIR = os.environ["EMBEDFILL_TEST_DJANGO_BASE_DIR"]
    EMBEDFILL_CONFIG = "embedfill.toml"  # relative: read from BASE_DIR
elif _variant == "reverse_relation":
    EMBEDFILL["targets"][0].update(model="docs.Organisation", field="document")
    del EMBEDFILL["targets"][0]["tenant_field"]
elif _variant == "routers":
    # a second database that the app's models stay off (DATABASE_ROUTERS)
    _other = conninfo.conninfo_to_dict(os.environ["EMBEDFILL_TEST_DJANGO_DB2"])
    DATABASES["other"] = {**DATABASES["default"], "NAME": _other.get("dbname")}
    DATABASE_ROUTERS = ["site_settings.routers.DocsOnDefault"]
elif _variant == "alias":
    # embedfill's own alias (its least-privilege role, in production); the app's
    # default stays as it is
    DATABASES["embedfill"] = dict(DATABASES["default"])
    DATABASES["default"]["NAME"] = "no_such_database_for_the_app"
    EMBEDFILL_DATABASE = "embedfill"
