"""normalize_url: DATABASE_URLs as apps write them -> what libpq accepts, or one sentence."""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg import conninfo

from embedfill.db.connect import Database
from embedfill.db.url import normalize_url
from embedfill.errors import ConfigError

BASE = {"user": "u", "password": "pw", "host": "h", "port": "5432", "dbname": "db"}


def params(url: str) -> dict[str, object]:
    return dict(conninfo.conninfo_to_dict(url))


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@h:5432/db",
        "postgres://u:pw@h:5432/db",
        "postgresql+psycopg://u:pw@h:5432/db",
        "postgresql+psycopg2://u:pw@h:5432/db",
        "postgresql+asyncpg://u:pw@h:5432/db",
        "POSTGRES://u:pw@h:5432/db",
        "pgsql://u:pw@h:5432/db",
        "postgis://u:pw@h:5432/db",
    ],
)
def test_schemes_apps_use_become_a_libpq_url(url: str) -> None:
    n = normalize_url(url)
    assert n.url.startswith("postgresql://")
    assert params(n.url) == BASE
    assert n.prepare and n.connection_limit is None and n.notes == ()


@pytest.mark.parametrize(
    ("query", "path"),
    [
        ("currentSchema=app", '-csearch_path="app",public'),
        ("currentSchema=app,audit", '-csearch_path="app","audit",public'),
        ("currentSchema=app,public,audit", '-csearch_path="app","public","audit"'),
    ],
)
def test_jdbc_current_schema_becomes_the_search_path(query: str, path: str) -> None:
    n = normalize_url(f"postgresql://u:pw@h:5432/db?{query}")
    assert params(n.url) == BASE | {"options": path}


def test_an_empty_current_schema_is_one_sentence() -> None:
    with pytest.raises(ConfigError, match="currentSchema in DATABASE_URL has an empty schema"):
        normalize_url("postgresql://u:pw@h:5432/db?currentSchema=app,")


def test_prisma_schema_becomes_the_search_path_with_public_after_it() -> None:
    n = normalize_url("postgresql://u:pw@h:5432/db?schema=app")
    assert params(n.url) == BASE | {"options": '-csearch_path="app",public'}


@pytest.mark.parametrize(
    ("schema", "options"),
    [
        ("public", '-csearch_path="public"'),
        ("My%20App", '-csearch_path="My\\ App",public'),
        ("we%22ird", '-csearch_path="we""ird",public'),
        ("back%5Cslash", '-csearch_path="back\\\\slash",public'),
        ("Ünïcode", '-csearch_path="Ünïcode",public'),
    ],
)
def test_schema_names_are_quoted_for_search_path_and_options(schema: str, options: str) -> None:
    n = normalize_url(f"postgresql://u:pw@h:5432/db?schema={schema}")
    assert params(n.url)["options"] == options


def test_schema_joins_options_already_given() -> None:
    n = normalize_url(
        "postgresql://u:pw@h:5432/db?options=-c%20statement_timeout%3D5000&schema=app"
    )
    assert params(n.url)["options"] == '-c statement_timeout=5000 -csearch_path="app",public'


def test_connection_limit_is_kept_for_the_engine_not_sent_to_libpq() -> None:
    n = normalize_url("postgresql://u:pw@h:5432/db?connection_limit=5")
    assert n.connection_limit == 5
    assert params(n.url) == BASE


@pytest.mark.parametrize("value", ["0", "-1", "many", "", "1.5"])
def test_a_bad_connection_limit_is_one_sentence(value: str) -> None:
    with pytest.raises(ConfigError, match="connection_limit in DATABASE_URL must be"):
        normalize_url(f"postgresql://u:pw@h:5432/db?connection_limit={value}")


def test_pgbouncer_turns_off_prepared_statements_and_warns_about_the_lock() -> None:
    n = normalize_url("postgresql://u:pw@h:6432/db?pgbouncer=true&schema=app")
    assert not n.prepare
    assert "pgbouncer" not in str(params(n.url))
    (note,) = n.notes
    assert "advisory lock" in note and "session" in note
    assert normalize_url("postgresql://u:pw@h:6432/db?pgbouncer=false").prepare


def test_statement_cache_size_zero_also_turns_off_prepared_statements() -> None:
    assert not normalize_url("postgresql://u:pw@h/db?statement_cache_size=0").prepare
    assert normalize_url("postgresql://u:pw@h/db?statement_cache_size=100").prepare


def test_every_libpq_parameter_passes_through() -> None:
    query = (
        "sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=my%20app"
        "&connect_timeout=5&target_session_attrs=read-write&keepalives=1"
    )
    n = normalize_url(f"postgresql://u:pw@h:5432/db?{query}")
    assert params(n.url) == BASE | {
        "sslmode": "verify-full",
        "sslrootcert": "/etc/ca.pem",
        "application_name": "my app",
        "connect_timeout": "5",
        "target_session_attrs": "read-write",
        "keepalives": "1",
    }


@pytest.mark.parametrize(
    ("value", "sslmode"), [("require", "require"), ("true", "require"), ("disable", "disable")]
)
def test_asyncpg_ssl_becomes_sslmode(value: str, sslmode: str) -> None:
    n = normalize_url(f"postgresql+asyncpg://u:pw@h:5432/db?ssl={value}")
    assert params(n.url) == BASE | {"sslmode": sslmode}


def test_prisma_pool_settings_are_dropped() -> None:
    n = normalize_url("postgresql://u:pw@h:5432/db?pool_timeout=10&socket_timeout=5")
    assert params(n.url) == BASE


def test_socket_hosts_and_multiple_hosts_pass_through() -> None:
    n = normalize_url("postgres://u:pw@/db?host=%2Fvar%2Frun%2Fpostgresql&schema=app")
    assert params(n.url)["host"] == "/var/run/postgresql"
    n = normalize_url("postgresql://u:pw@h1:5432,h2:5433/db")
    assert params(n.url)["host"] == "h1,h2"


@pytest.mark.parametrize("name", ["foo", "sslmdoe", "currentschema", "sslaccept"])
def test_an_unknown_parameter_is_named_in_one_sentence(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        normalize_url(f"postgresql://u:Secret9pw@h:5432/db?{name}=zzvalue")
    msg = str(info.value)
    assert f"parameter {name!r}" in msg
    assert "Secret9pw" not in msg and "zzvalue" not in msg
    assert msg.endswith(".") and ". " not in msg and "\n" not in msg


def test_key_value_conninfo_passes_through() -> None:
    dsn = "host=/tmp/pg port=5433 dbname=x user=y"
    assert normalize_url(dsn).url == dsn


@pytest.mark.parametrize(
    ("url", "fragments", "hint"),
    [
        (
            "postgresql://app:p%zzsecret@db.example.com:5432/app",
            ["p%zz", "zzsecret", "%zz"],
            "a '%' in it must be written %25",
        ),
        (
            "postgresql://app:Kx9@Qv7secret@db.example.com:5432/app",
            ["Kx9", "Qv7secret"],
            "%40",
        ),
        ("postgresql://app:Kx9/Qv7secret@db.example.com/app", ["Kx9", "Qv7secret"], "%2F"),
        ("postgresql://app:Kx9?Qv7secret@db.example.com/app", ["Kx9", "Qv7secret"], "%3F"),
        ("postgresql://app:Kx9?Qv7secret=1@db/app", ["Kx9", "Qv7secret"], "%3F"),
        ("postgresql://app:Kx9%00Qv7secret@db/app", ["Kx9", "Qv7secret"], "%00"),
        ("postgresql://app:Kx9Qv7secret@db:54x2/app", ["Kx9", "Qv7secret", "54x2"], "port"),
        ("host=db password=Kx9 Qv7secret dbname=app", ["Kx9", "Qv7secret"], "key=value"),
        ("mysql://app:Kx9Qv7secret@db/app", ["Kx9", "Qv7secret"], "postgresql://"),
        ("jdbc:postgresql://db/app?password=Kx9Qv7secret", ["Kx9", "Qv7secret"], "postgresql://"),
    ],
)
def test_malformed_urls_say_what_is_wrong_without_quoting_the_url(
    url: str, fragments: list[str], hint: str
) -> None:
    with pytest.raises(ConfigError) as info:
        normalize_url(url)
    msg = str(info.value)
    assert msg.startswith("DATABASE_URL ")
    assert hint in msg
    for fragment in fragments:
        assert fragment not in msg
    assert info.value.__suppress_context__ or info.value.__context__ is None


def test_database_normalizes_its_url_and_never_shows_the_password() -> None:
    db = Database("postgres://u:Secret9pw@h:5432/db?schema=app&connection_limit=3&pgbouncer=true")
    assert db.url.startswith("postgresql://") and db.connection_limit == 3 and not db.prepare
    assert "Secret9pw" not in repr(db) and "Secret9pw" not in db.describe()
    assert Database(db.url).url == db.url  # normalizing twice changes nothing


@pytest.mark.parametrize(
    ("limit", "wanted", "lanes"),
    [
        (None, 4, 3),
        (None, 2, 1),
        (None, 1, 0),
        (6, 4, 3),
        (5, 4, 3),
        (4, 4, 2),
        (3, 4, 1),
        (2, 4, 0),
        (2, 2, 0),
        (1, 4, 0),
    ],
)
def test_connection_limit_caps_the_writer_lanes(limit: int | None, wanted: int, lanes: int) -> None:
    # a worker process holds its control connection and its table lane (which writes
    # too): write_concurrency - 1 writer lanes more, within the limit
    query = f"?connection_limit={limit}" if limit else ""
    assert Database(f"postgresql://u@h/db{query}").writer_lanes(wanted) == lanes


def test_embedfill_database_url_wins_over_database_url() -> None:
    """An app whose DATABASE_URL is its own role's gives embedfill another one without
    touching it (a Django app exporting the least-privilege URL made manage.py itself
    connect as that role)."""
    from embedfill.db.connect import resolve_database, url_from_env

    app = "postgresql://app_owner:pw@h:5432/db"
    mine = "postgresql://embedfill_rw:pw@h:5432/db"
    assert url_from_env({"DATABASE_URL": app, "EMBEDFILL_DATABASE_URL": mine}) == mine
    assert url_from_env({"DATABASE_URL": app, "EMBEDFILL_DATABASE_URL": "  "}) == app
    assert url_from_env({"DATABASE_URL": app}) == app
    assert url_from_env({}) == ""
    db = resolve_database({"DATABASE_URL": app, "EMBEDFILL_DATABASE_URL": mine})
    assert "embedfill_rw" in db.url


def test_a_url_to_a_stopped_embedded_server_says_how_to_reach_it(tmp_path: Path) -> None:
    """The embedded server listens on a socket in its data directory only while an
    embedfill command runs it: a DATABASE_URL naming that directory, with none running,
    said only "No such file or directory; check DATABASE_URL"."""
    import asyncio

    from embedfill.db.connect import connect
    from embedfill.errors import DatabaseError

    (tmp_path / "PG_VERSION").write_text("18\n")
    db = Database(url=f"postgresql://postgres:@/postgres?host={tmp_path}")
    with pytest.raises(DatabaseError) as caught:
        asyncio.run(connect(db))
    assert f"{tmp_path} holds embedfill's embedded database" in str(caught.value)
    assert "unset it to let this command start it" in str(caught.value)
    elsewhere = Database(url=f"postgresql://postgres:@/postgres?host={tmp_path / 'nothing'}")
    with pytest.raises(DatabaseError) as caught:
        asyncio.run(connect(elsewhere))
    assert "embedded" not in str(caught.value)
