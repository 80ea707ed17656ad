from __future__ import annotations

from pathlib import Path

import pytest

from embedfill.config import (
    TableName,
    load_config,
    parse_config,
    parse_table_name,
    render_text,
    template_columns,
)
from embedfill.errors import ConfigError, TargetNotFound

EXAMPLE = """
[providers.openai]
kind = "openai"
model = "text-embedding-3-small"
dimensions = 1536
base_url = "http://127.0.0.1:8765/v1"
api_key_env = "OPENAI_API_KEY"
batch_size = 50
max_concurrency = 4
rpm = 0
tpm = 0

[providers.local]
kind = "local"
model = "all-MiniLM-L6-v2"

[[targets]]
name = "tickets"
table = "app.SupportTickets"
id_column = "ticket_no"
text = "{subject}\\n\\n{body}"
embedding_column = "emb"
tenant_column = "org"
provider = "openai"
tenant_key_sql = "select api_key from app.org_settings where org = %(tenant)s"
"""


def test_the_readme_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(EXAMPLE)
    config = load_config(path)
    target = config.target("tickets")
    assert target.table == TableName("app", "SupportTickets")
    assert target.text_columns == ("subject", "body")
    assert target.allow_platform_fallback is True
    openai = config.provider_for(target)
    assert openai.batch_size == 50 and openai.expected_dimensions == 1536
    assert openai.price == pytest.approx(0.02)
    local = config.providers["local"]
    assert local.expected_dimensions == 384 and local.max_concurrency == 1 and local.price == 0


def test_default_config_is_the_demo_target() -> None:
    config = load_config(None)
    assert config.target(None).name == "workflow_insights"
    assert config.provider_for(config.target(None)).kind == "local"


RENAME = "rename it (a Django model: its db_table or db_column)"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["providers"]["openai"].update(batchsize=5),
            "Unknown key 'batchsize' in [providers.openai]",
        ),
        (
            lambda d: d["providers"]["openai"].update(batch_size="5"),
            "Key 'batch_size' in [providers.openai] must be a int",
        ),
        (lambda d: d["providers"]["openai"].update(batch_size=4096), "at most 2048"),
        (lambda d: d["providers"]["openai"].update(kind="cohere"), "needs kind = one of"),
        (lambda d: d["targets"][0].update(provider="nope"), "provider 'nope', which is not"),
        (lambda d: d["targets"][0].pop("id_column"), "needs id_column"),
        (lambda d: d["targets"][0].update(text="{a.b}"), "only plain column names"),
        (lambda d: d["targets"][0].update(text="no columns"), "names no column"),
        (lambda d: d["targets"][0].update(tenant_key_sql="select 1"), "%(tenant)s"),
        (
            lambda d: d["targets"][0].update(text_sql="subject || body"),
            "The target 'tickets' sets both text and text_sql; keep one",
        ),
        (
            lambda d: d["targets"][0].pop("text"),
            "The target 'tickets' needs text = \"{column} ...\" (a template over columns) "
            'or text_sql = "..."',
        ),
        (
            lambda d: d["targets"][0].update(text="", text_sql="  "),
            "needs text = ",
        ),
        (
            lambda d: d["targets"][0].update(text_sql=5),
            "Key 'text_sql' in target 'tickets' must be a str",
        ),
        (lambda d: d.update(extra=1), "Unknown top-level key 'extra'"),
        (
            lambda d: d.update(engine={"lease_s": 61}),
            "[engine] lease_s is 61, more than 60: a killed worker's chunks would wait that "
            "long for another worker; use at most 60.",
        ),
        (lambda d: d.update(engine={"chunk_rows": 0}), "chunk_rows"),
        (lambda d: d.update(engine={"worker_chunks": -1}), "worker_chunks"),
        (lambda d: d["targets"].append(dict(d["targets"][0])), "Two targets"),
        (
            lambda d: d["targets"][0].update(embedding_table="SupportTickets_emb_next"),
            "The target 'tickets' keeps its vectors in embedding_table "
            "'SupportTickets_emb_next', whose vector column is \"embedding\"; remove "
            "embedding_column (it named the live table's).",
        ),
        (
            lambda d: (
                d["targets"][0].update(embedding_table="side"),
                d["targets"][0].pop("embedding_column"),
                d["targets"][0].pop("text"),
            ),
            "The target 'tickets' needs text = ",  # the live rows' text, read for the side
        ),
        *(
            (
                lambda d, key=key, name=name: d["targets"][0].update({key: name}),
                f"The target 'tickets' names {shown!r} in {key}, and embedfill "
                f"cannot use a name holding '%' in its statements; {fix}.",
            )
            for key, name, shown, fix in (
                ("table", 'app."Support%Tickets"', "Support%Tickets", RENAME),
                ("table", '"a%b".tickets', "a%b", RENAME),
                ("id_column", "ticket%no", "ticket%no", RENAME),
                ("embedding_column", "emb%", "emb%", RENAME),
                ("tenant_column", "te%nant", "te%nant", RENAME),
                ("text", "{sub%ject}", "sub%ject", "rename the column, or read it with text_sql"),
            )
        ),
    ],
)
def test_bad_config_is_one_clear_sentence(mutate: object, message: str) -> None:
    import tomllib

    data = tomllib.loads(EXAMPLE)
    mutate(data)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(data)
    assert message in str(info.value)
    assert str(info.value).endswith(".")


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[providers\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)


def test_unknown_target() -> None:
    with pytest.raises(TargetNotFound, match="known targets: workflow_insights"):
        load_config(None).target("nope")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("tickets", TableName(None, "tickets")),
        ("app.SupportTickets", TableName("app", "SupportTickets")),
        ('"we.ird".table', TableName("we.ird", "table")),
        ('"My Schema"."Tick""ets"', TableName("My Schema", 'Tick"ets')),
    ],
)
def test_table_names(raw: str, expected: TableName) -> None:
    assert parse_table_name(raw) == expected


@pytest.mark.parametrize("raw", ["a.b.c", "", "a.", '"open'])
def test_bad_table_names(raw: str) -> None:
    with pytest.raises(ConfigError, match="not a valid name"):
        parse_table_name(raw)


def test_templates() -> None:
    assert template_columns("{a} and {b} and {a} {{literal}}", "t") == ("a", "b")
    assert render_text("{a}|{b}", {"a": None, "b": 3}) == "|3"


def test_text_sql_instead_of_a_template() -> None:
    import tomllib

    data = tomllib.loads(EXAMPLE)
    del data["targets"][0]["text"]
    data["targets"][0]["text_sql"] = "subject || E'\\n\\n' || body"
    target = parse_config(data).target("tickets")
    assert target.text is None and target.text_columns == ()
    assert target.text_sql == "subject || E'\\n\\n' || body"


def test_a_target_built_in_code_derives_its_columns() -> None:
    from dataclasses import replace

    from embedfill.config import TargetConfig

    target = TargetConfig(
        name="t",
        table=parse_table_name("app.docs"),
        id_column="id",
        text="{title}: {body}",
        embedding_column="emb",
        provider="p",
    )
    assert target.text_columns == ("title", "body")
    switched = replace(target, text=None, text_sql="title")
    assert switched.text_columns == ()
    with pytest.raises(ConfigError, match="sets both text and text_sql"):
        replace(target, text_sql="title")


def test_job_settings_have_defaults_and_can_be_set() -> None:
    import tomllib

    data = tomllib.loads(EXAMPLE)
    assert parse_config(data).engine.lease_s == 30  # at most 60: see [engine] lease_s
    data["engine"] = {"lease_s": 5, "chunk_rows": 100, "worker_chunks": 3}
    engine = parse_config(data).engine
    assert (engine.lease_s, engine.chunk_rows, engine.worker_chunks) == (5, 100, 3)


def test_the_new_vectors_index_build_runs_in_one_process_unless_told_otherwise() -> None:
    """[engine] model_index_workers: 0 by default (the app's searches keep the other
    cores), any count allowed, never negative."""
    import tomllib

    data = tomllib.loads(EXAMPLE)
    assert parse_config(data).engine.model_index_workers == 0
    data["engine"] = {"model_index_workers": 4}
    assert parse_config(data).engine.model_index_workers == 4
    data["engine"] = {"model_index_workers": -1}
    with pytest.raises(ConfigError, match="model_index_workers"):
        parse_config(data)


def test_a_target_name_with_an_at_sign_is_refused() -> None:
    """'@' names the new vectors of a change of model (target@provider): a target of the
    user's so named would pass for them (a worker would take its real failures for
    vectors a finalize dropped)."""
    from embedfill.config import parse_config
    from embedfill.errors import ConfigError

    raw = {
        "providers": {"p": {"kind": "hash", "dimensions": 8}},
        "targets": [
            {
                "name": "tickets@next",
                "table": "t",
                "id_column": "id",
                "text": "{body}",
                "embedding_column": "emb",
                "provider": "p",
            }
        ],
    }
    with pytest.raises(ConfigError, match="'@' in its name"):
        parse_config(raw)


def test_a_target_in_its_side_table_reads_the_live_rows_text_and_keys() -> None:
    """``embedding_table`` (where a table-strategy change of model leaves the vectors):
    the target's rows, ids, tenants and vectors are the side table's; its text, tenant
    keys and the fingerprint a worker checks are the live target's."""
    import tomllib

    from embedfill.jobs.spec import vector_settings

    data = tomllib.loads(EXAMPLE)
    target = data["targets"][0]
    del target["embedding_column"]
    target["embedding_table"] = "SupportTickets_emb_next"
    config = parse_config(data)
    side = config.target("tickets")
    assert side.table == TableName("app", "SupportTickets_emb_next")
    assert (side.id_column, side.tenant_column, side.embedding_column) == (
        "embedfill_row_id",
        "embedfill_tenant",
        "embedding",
    )
    assert side.text is None and side.text_sql is None
    assert side.tenant_key_sql == target["tenant_key_sql"]
    assert side.side_of is not None and side.side_of.table == TableName("app", "SupportTickets")
    assert side.side_of.text_columns == ("subject", "body")
    settings = vector_settings(side, config.provider_for(side))
    assert settings["text"] == "{subject}\n\n{body}"
    other = dict(target, text="{body}")
    changed = parse_config({**data, "targets": [other]}).target("tickets")
    assert vector_settings(changed, config.provider_for(changed)) != settings


def test_an_embedding_table_may_name_its_schema_as_model_status_shows_it() -> None:
    import tomllib

    data = tomllib.loads(EXAMPLE)
    target = data["targets"][0]
    del target["embedding_column"]
    target["embedding_table"] = "app.SupportTickets_emb_next"
    side = parse_config(data).target("tickets")
    assert side.table == TableName("app", "SupportTickets_emb_next")
    target["embedding_table"] = "my.tickets_emb_next"  # a quoted table's name, dot and all
    side = parse_config(data).target("tickets")
    assert side.table == TableName("app", "my.tickets_emb_next")


def test_a_name_with_a_percent_sign_is_refused_however_the_config_is_built() -> None:
    """Built in code (the dataclasses, as a library user may) or naming a side table,
    a '%' in a name is the same sentence as in a TOML file."""
    from embedfill.config import TargetConfig, in_side_table

    fields = dict(name="t", table=TableName("app", "docs"), id_column="id", text="{body}")
    fields |= dict(embedding_column="emb", provider="p")
    with pytest.raises(ConfigError, match=r"names 'te%nant' in tenant_column, and embedfill"):
        TargetConfig(**fields, tenant_column="te%nant")  # type: ignore[arg-type]
    live = TargetConfig(**fields)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"names 'si%de' in embedding_table, and embedfill"):
        in_side_table(live, "si%de")
