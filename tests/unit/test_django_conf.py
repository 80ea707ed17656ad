"""contrib.django's reading of one DATABASES entry (no Django set-up needed)."""

from __future__ import annotations

import pytest
from psycopg import conninfo

from embedfill.contrib.django.conf import prepares, url_of
from embedfill.db.connect import Database
from embedfill.errors import ConfigError

PG = "django.db.backends.postgresql"


def test_a_databases_entry_becomes_a_libpq_string() -> None:
    url = url_of(
        {
            "ENGINE": PG,
            "NAME": "app db",
            "USER": "embedfill",
            "PASSWORD": "p w'd",
            "HOST": "db.internal",
            "PORT": 6432,
            "OPTIONS": {"sslmode": "require", "pool": True, "isolation_level": 1},
        },
        "default",
    )
    assert conninfo.conninfo_to_dict(url) == {
        "dbname": "app db",
        "user": "embedfill",
        "password": "p w'd",
        "host": "db.internal",
        "port": "6432",
        "sslmode": "require",
    }
    db = Database(url=url)
    assert "p w'd" not in repr(db) and "p w'd" not in db.describe()


def test_empty_settings_are_left_to_libpq() -> None:
    url = url_of({"ENGINE": PG, "NAME": "app", "USER": "", "HOST": "", "PORT": ""}, "default")
    assert conninfo.conninfo_to_dict(url) == {"dbname": "app"}


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"ENGINE": "django.db.backends.sqlite3", "NAME": "x"}, "needs PostgreSQL"),
        ({"ENGINE": PG, "NAME": ""}, "has no NAME"),
    ],
)
def test_an_entry_embedfill_cannot_use_is_one_sentence(entry: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words) as caught:
        url_of(entry, "default")
    assert "DATABASES['default']" in str(caught.value)


def test_behind_a_transaction_pooler_no_statement_is_prepared() -> None:
    assert prepares({"ENGINE": PG, "NAME": "app"})
    assert not prepares({"ENGINE": PG, "NAME": "app", "DISABLE_SERVER_SIDE_CURSORS": True})
    assert not prepares({"ENGINE": PG, "NAME": "app", "OPTIONS": {"prepare_threshold": None}})
    assert prepares({"ENGINE": PG, "NAME": "app", "OPTIONS": {"prepare_threshold": 5}})
