"""embedfill.contrib.django in a real Django project (tests/django_project) against the
real PostgreSQL: ``manage.py embedfill``, the migration operations, the system check,
``manage.py test`` and a data migration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from embedfill.providers.hashing import hash_vector
from tests.support.cli import cli_env, embedfill

PROJECT = Path(__file__).parent.parent / "django_project"
# the app's environment points elsewhere: embedfill must take Django's settings
ELSEWHERE = "postgresql://nobody@127.0.0.1:1/not_this_one"


def manage(
    *args: str, db_url: str, variant: str = "", timeout: float = 120, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = cli_env(
        ELSEWHERE,
        EMBEDFILL_TEST_DJANGO_DB=db_url,
        EMBEDFILL_TEST_DJANGO_VARIANT=variant,
        DJANGO_SETTINGS_MODULE="site_settings.settings",
        **extra,
    )
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT,
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
    )


def triggers_on(db_url: str, table: str = "docs_documents") -> list[str]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT tgname FROM pg_catalog.pg_trigger WHERE tgrelid = %s::regclass"
            " AND NOT tgisinternal ORDER BY 1",
            [table],
        ).fetchall()
    return [r[0] for r in rows]


@pytest.fixture
def migrated(db_url: str) -> str:
    done = manage("migrate", "--no-input", db_url=db_url)
    assert done.returncode == 0, done.stderr
    return db_url


def test_migrate_installs_the_triggers_and_the_data_migration_fills(migrated: str) -> None:
    assert triggers_on(migrated) == ["embedfill_changed_1_ins", "embedfill_changed_1_upd"]
    with psycopg.connect(migrated) as conn:
        row = conn.execute("SELECT title, embedding IS NOT NULL FROM docs_documents").fetchone()
    assert row == ("Welcome", True)  # 0003, a non-atomic data migration, ran a backfill


def test_manage_py_embedfill_runs_the_cli_with_djangos_settings(migrated: str) -> None:
    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO docs_documents (organisation_id, title, body)"
            " SELECT id, 'doc ' || g, 'body' FROM docs_organisation, generate_series(1, 30) g"
        )
    done = manage("embedfill", "status", "--json", db_url=migrated)
    assert done.returncode == 0, done.stderr
    (status,) = json.loads(done.stdout)["targets"]
    assert status["name"] == "documents"
    assert (status["rows"], status["missing"]) == (31, 30)

    # --processes starts workers as `manage.py embedfill worker`: they take Django's too
    done = manage("embedfill", "backfill", "--processes", "2", db_url=migrated)
    assert done.returncode == 0, done.stderr
    with psycopg.connect(migrated) as conn:
        left = conn.execute("SELECT count(*) FROM docs_documents WHERE embedding IS NULL")
        assert left.fetchone() == (0,)
        # the template's field names became columns: each vector is its row's text's
        stored = conn.execute(
            "SELECT embedding::text FROM docs_documents WHERE title = 'doc 7'"
        ).fetchone()
    assert stored is not None
    got = [float(x) for x in stored[0].strip("[]").split(",")]
    assert got == pytest.approx(list(hash_vector("doc 7\n\nbody", 8)), abs=1e-6)


def test_manage_py_embedfill_has_the_clis_exit_codes_and_errors(
    migrated: str, tmp_path: Path
) -> None:
    toml = tmp_path / "same.toml"
    toml.write_text(
        '[providers.hash]\nkind = "hash"\nmodel = "hash-8"\ndimensions = 8\n\n'
        '[[targets]]\nname = "documents"\ntable = "docs_documents"\nid_column = "id"\n'
        'text = "{title}\\n\\n{body}"\nembedding_column = "embedding"\n'
        'tenant_column = "organisation_id"\nprovider = "hash"\n'
    )
    plain = embedfill("--config", str(toml), "status", "--target", "nope", env=cli_env(migrated))
    django = manage("embedfill", "status", "--target", "nope", db_url=migrated)
    assert plain.returncode == django.returncode == 2
    assert plain.stderr == django.stderr
    assert "nope" in django.stderr

    same = embedfill("--config", str(toml), "status", "--json", env=cli_env(migrated))
    assert json.loads(same.stdout) == json.loads(
        manage("embedfill", "status", "--json", db_url=migrated).stdout
    )

    helped = manage("embedfill", "--help", db_url=migrated)
    assert helped.returncode == 0
    assert "manage.py embedfill" in helped.stdout and "backfill" in helped.stdout
    # manage.py's own --settings is manage.py's, not a flag the CLI refuses
    settled = manage("embedfill", "status", "--settings", "site_settings.settings", db_url=migrated)
    assert settled.returncode == 0, settled.stderr


def test_call_command_raises_with_the_exit_code(migrated: str) -> None:
    code = (
        "from django.core.management import call_command, CommandError\n"
        "call_command('embedfill', 'status', '--json')\n"
        "try:\n"
        "    call_command('embedfill', 'status', '--target', 'nope')\n"
        "except CommandError as exc:\n"
        "    print('returncode', exc.returncode)\n"
    )
    done = manage("shell", "-c", code, db_url=migrated)
    assert done.returncode == 0, done.stderr
    assert "returncode 2" in done.stdout
    assert '"name": "documents"' in done.stdout


def test_the_migration_operations_reverse_each_other(migrated: str) -> None:
    """Back to 0001 (0004 renames the table back, 0002 removes the triggers) and forward
    again: each step sees the table by the name it had then."""
    back = manage("migrate", "docs", "0001", db_url=migrated)
    assert back.returncode == 0, back.stderr
    assert triggers_on(migrated, "docs_document") == []
    shown = manage("sqlmigrate", "docs", "0002", db_url=migrated)
    assert shown.returncode == 0, shown.stderr
    assert "embedfill_changed_1_ins" in shown.stdout and "EXECUTE FUNCTION" in shown.stdout
    assert triggers_on(migrated, "docs_document") == []  # sqlmigrate changed nothing
    again = manage("migrate", "docs", "0002", db_url=migrated)
    assert again.returncode == 0, again.stderr
    both = ["embedfill_changed_1_ins", "embedfill_changed_1_upd"]
    assert triggers_on(migrated, "docs_document") == both
    forward = manage("migrate", "docs", db_url=migrated)
    assert forward.returncode == 0, forward.stderr
    assert triggers_on(migrated) == both  # the triggers went with the renamed table
    # with the triggers on, the app's own schema changes go through
    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute("ALTER TABLE docs_documents ALTER COLUMN title TYPE varchar(300)")


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("missing_field", ["embedfill.E004", "'vector'", "docs.Document"]),
        ("wrong_size", ["embedfill.E006", "docs.Document.embedding", "vector(8)", "16"]),
        ("template_field", ["embedfill.E004", "{summary}"]),
    ],
)
def test_the_system_check_names_what_does_not_fit(
    db_url: str, variant: str, expected: list[str]
) -> None:
    done = manage("check", db_url=db_url, variant=variant)
    assert done.returncode == 1
    for text in expected:
        assert text in done.stderr, done.stderr
    # and a command says the first of them in one sentence, exit 2, nothing written
    refused = manage("embedfill", "status", db_url=db_url, variant=variant)
    assert refused.returncode == 2
    assert expected[1] in refused.stderr


def test_the_system_check_passes_a_fitting_config(db_url: str) -> None:
    done = manage("check", db_url=db_url)
    assert done.returncode == 0, done.stderr
    assert "no issues" in done.stdout


def test_embedfill_database_names_the_alias(migrated: str) -> None:
    done = manage("embedfill", "status", "--json", db_url=migrated, variant="alias")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["targets"][0]["rows"] == 1


def test_a_toml_file_may_name_the_model(migrated: str, tmp_path: Path) -> None:
    toml = tmp_path / "embedfill.toml"
    toml.write_text(
        '[providers.hash]\nkind = "hash"\nmodel = "hash-8"\ndimensions = 8\n\n'
        '[[targets]]\nmodel = "docs.Document"\nfield = "embedding"\n'
        'tenant_field = "organisation"\ntext = "{title}"\nprovider = "hash"\n'
    )
    done = manage(
        "embedfill",
        "status",
        "--json",
        db_url=migrated,
        variant="toml",
        EMBEDFILL_TEST_DJANGO_TOML=str(toml),
    )
    assert done.returncode == 0, done.stderr
    (status,) = json.loads(done.stdout)["targets"]
    assert status["name"] == "docs_documents"  # a model target's name defaults to its table


def test_manage_py_test_uses_the_test_database(db_url: str, server_url: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    done = manage("test", "docs", "--no-input", db_url=db_url, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "Ran 2 tests" in done.stderr and "OK" in done.stderr
    with psycopg.connect(server_url) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_catalog.pg_database WHERE datname = %s", [f"test_{name}"]
        ).fetchone()
    assert left == (0,)  # created, migrated, dropped
    with psycopg.connect(db_url) as conn:  # and the app's own database untouched
        untouched = conn.execute("SELECT to_regclass('docs_documents') IS NULL").fetchone()
    assert untouched == (True,)


def test_processes_from_any_script_run_workers_through_django(
    migrated: str, tmp_path: Path
) -> None:
    """`backfill --processes 2` through call_command in a script of the user's: the
    children are `python -m django embedfill worker`, never that script again."""
    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO docs_documents (organisation_id, title, body)"
            " SELECT id, 'doc ' || g, 'body' FROM docs_organisation, generate_series(1, 40) g"
        )
    script = tmp_path / "fill.py"
    script.write_text(
        "import sys, django\n"
        f"sys.path.insert(0, {str(PROJECT)!r})\n"
        "django.setup()\n"
        "from django.core.management import call_command\n"
        "print('script started', flush=True)\n"
        "call_command('embedfill', '--debug', 'backfill', '--processes', '2')\n"
    )
    env = cli_env(
        ELSEWHERE,
        EMBEDFILL_TEST_DJANGO_DB=migrated,
        DJANGO_SETTINGS_MODULE="site_settings.settings",
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("script started") == 1
    with psycopg.connect(migrated) as conn:
        assert conn.execute(
            "SELECT count(*) FROM docs_documents WHERE embedding IS NULL"
        ).fetchone() == (0,)
        jobs = conn.execute(
            "SELECT count(*) FROM embedfill.runs WHERE NOT dry_run AND target = 'documents'"
        ).fetchone()
    assert jobs == (2,)  # the data migration's, and this one: no script ran again


def test_manage_py_help_embedfill_is_the_clis_help(db_url: str) -> None:
    helped = manage("help", "embedfill", db_url=db_url)
    assert helped.returncode == 0
    assert "backfill" in helped.stdout and "--verbosity" not in helped.stdout


def test_a_relation_named_as_a_field_is_a_check_error_not_a_traceback(db_url: str) -> None:
    done = manage("check", db_url=db_url, variant="reverse_relation")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "embedfill.E004" in done.stderr and "a relation of docs.Organisation" in done.stderr


def test_the_trigger_operations_follow_the_routers(db_url: str, bare_db_url: str) -> None:
    """`migrate --database other`, where DATABASE_ROUTERS keep docs off it: the trigger
    operation is skipped there as CreateModel is (that database has no pgvector)."""
    done = manage(
        "migrate",
        "--database",
        "other",
        db_url=db_url,
        variant="routers",
        EMBEDFILL_TEST_DJANGO_DB2=bare_db_url,
    )
    assert done.returncode == 0, done.stderr
    with psycopg.connect(bare_db_url) as conn:
        assert conn.execute("SELECT to_regclass('docs_documents')").fetchone() == (None,)


def test_sqlmigrate_before_the_table_exists_says_so(db_url: str) -> None:
    shown = manage("sqlmigrate", "docs", "0002", db_url=db_url)
    assert shown.returncode == 0, shown.stderr
    assert "-- embedfill:" in shown.stdout and "does not exist" in shown.stdout


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("parent_field", ["embedfill.E004", "lives in the table of docs.Document"]),
        ("composite_pk", ["embedfill.E003", "primary key spans several columns"]),
    ],
)
def test_shapes_a_target_cannot_fill_are_named(
    db_url: str, variant: str, expected: list[str]
) -> None:
    done = manage("check", db_url=db_url, variant=variant)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    for text in expected:
        assert text in done.stderr, done.stderr


def test_settings_a_command_cannot_use_are_named(db_url: str, tmp_path: Path) -> None:
    """EMBEDFILL_DATABASE naming no alias is a check error; a connection that fails names
    the DATABASES entry, not DATABASE_URL."""
    done = manage("check", db_url=db_url, variant="bad_alias")
    assert done.returncode == 1 and "embedfill.E007" in done.stderr and "'nope'" in done.stderr
    down = manage("embedfill", "status", db_url=f"host={tmp_path} dbname=none")
    assert down.returncode == 1
    assert "check DATABASES['default'] in the Django settings" in down.stderr


def test_a_relative_config_is_read_from_base_dir_and_dotenv_as_the_cli_does(
    migrated: str, tmp_path: Path
) -> None:
    base, elsewhere = tmp_path / "project", tmp_path / "cron"
    base.mkdir()
    elsewhere.mkdir()
    (base / "embedfill.toml").write_text(
        '[providers.hash]\nkind = "hash"\nmodel = "hash-8"\ndimensions = 8\n\n'
        '[[targets]]\nname = "from_base_dir"\nmodel = "docs.Document"\nfield = "embedding"\n'
        'text = "{title}"\nprovider = "hash"\n'
    )
    env = cli_env(
        ELSEWHERE,
        EMBEDFILL_TEST_DJANGO_DB=migrated,
        EMBEDFILL_TEST_DJANGO_VARIANT="relative_toml",
        EMBEDFILL_TEST_DJANGO_BASE_DIR=str(base),
        DJANGO_SETTINGS_MODULE="site_settings.settings",
    )

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(PROJECT / "manage.py"), "embedfill", "status", "--json"],
            cwd=elsewhere,
            env=env,
            text=True,
            capture_output=True,
            timeout=120,
        )

    done = status()  # run from another directory, as cron does
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["targets"][0]["name"] == "from_base_dir"
    # ./.env is read as `embedfill` reads it: here it names another config
    other = elsewhere / "other.toml"
    other.write_text((base / "embedfill.toml").read_text().replace("from_base_dir", "from_env"))
    (elsewhere / ".env").write_text(f"EMBEDFILL_CONFIG={other}\n")
    done = status()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["targets"][0]["name"] == "from_env"


def test_a_side_table_targets_trigger_operation_does_nothing_where_no_side_table_is(
    db_url: str, tmp_path: Path
) -> None:
    """After a table-strategy change of model the target names its side table
    (``embedding_table``); a fresh database (a test run, a new environment) has none. The
    migration that installed the target's triggers then does nothing, and says so in
    ``sqlmigrate``, instead of failing the migrate."""
    toml = tmp_path / "embedfill.toml"
    toml.write_text(
        '[providers.hash]\nkind = "hash"\nmodel = "hash-8"\ndimensions = 8\n\n'
        '[[targets]]\nname = "documents"\ntable = "docs_document"\nid_column = "id"\n'
        'text = "{title}"\ntenant_column = "organisation_id"\n'
        'embedding_table = "docs_document_emb_next"\nprovider = "hash"\n'
    )
    extra = {"variant": "toml", "EMBEDFILL_TEST_DJANGO_TOML": str(toml)}
    shown = manage("sqlmigrate", "docs", "0002", db_url=db_url, **extra)
    assert shown.returncode == 0, shown.stderr
    assert "InstallEmbedfillTriggers does nothing here" in shown.stdout
    done = manage("migrate", "docs", "0002", "--no-input", db_url=db_url, **extra)
    assert done.returncode == 0, done.stderr
    assert triggers_on(db_url, "docs_document") == []
    # a table that is there but no side table (a typo) fails the migration, as it would
    # fail the CLI: only a missing side table is passed over (helper-30)
    manage("migrate", "docs", "zero", "--no-input", db_url=db_url)
    toml.write_text(toml.read_text().replace("docs_document_emb_next", "docs_organisation"))
    done = manage("migrate", "docs", "0002", "--no-input", db_url=db_url, **extra)
    assert done.returncode != 0
    assert "docs_organisation" in done.stderr and "side table" in done.stderr
