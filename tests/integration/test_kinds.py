"""A new kind of provider is its own module and one line of ``kinds.KINDS``: a kind that
is not embedfill's (tests/support/echo_provider.py) is configured, checked and run
through a real backfill with nothing else changed."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from embedfill import BackfillOptions, Database, abackfill
from embedfill.errors import ConfigError
from embedfill.kinds import KINDS, Kind
from embedfill.providers import make_provider, needs_key
from tests.support.echo_provider import EchoProvider
from tests.support.tables import make_tickets, tickets_config

ECHO = Kind(
    "echo",
    "tests.support.echo_provider:EchoProvider",
    default_model="echo-1",
    needs_dimensions=True,
    concurrency=2,
)


@pytest.fixture
def echo(monkeypatch: pytest.MonkeyPatch) -> Kind:
    monkeypatch.setitem(KINDS, "echo", ECHO)  # type: ignore[index]
    return ECHO


def config(**provider: object) -> Any:
    """The tickets target on an `echo` provider section "e"."""
    return tickets_config(
        "http://127.0.0.1:9", providers={"e": {"kind": "echo", **provider}}, provider="e"
    )


def test_a_kind_registered_in_one_line_is_configured_from_its_line(echo: Kind) -> None:
    pconf = config(dimensions=8).providers["e"]
    assert pconf.model == "echo-1" and pconf.max_concurrency == 2
    assert not pconf.auto_concurrency and not needs_key(pconf)
    assert isinstance(make_provider(pconf), EchoProvider)
    with pytest.raises(ConfigError, match="of kind 'echo' needs dimensions = N"):
        config()


def test_an_unregistered_kind_is_refused_naming_the_registered_ones() -> None:
    named = "needs kind = one of 'openai', 'local', 'hash', not 'echo'"
    with pytest.raises(ConfigError, match=named):
        config(dimensions=8)


def test_a_backfill_runs_on_a_kind_registered_in_one_line(db_url: str, echo: Kind) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        make_tickets(conn, rows=40)
    cfg = config(dimensions=8)
    report = asyncio.run(abackfill(cfg, Database(db_url), BackfillOptions()))
    assert report.embedded == 30 and report.failed == 0 and report.provider == "echo:echo-1"
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            'SELECT subject, body, emb::text FROM app."SupportTickets" WHERE ticket_no % 4 <> 0'
        ).fetchall()
    assert rows and all(
        emb.startswith("[" + str(len(subject + "\n\n" + body)) + ",0,")
        for subject, body, emb in rows
    )


@pytest.mark.parametrize("requires", ["no_such_module_xyz", "no_such_package_xyz.sub"])
def test_a_kind_whose_extra_is_missing_says_which_to_install(
    monkeypatch: pytest.MonkeyPatch, requires: str
) -> None:
    """Through the factory and the class alike (a LocalProvider made directly raised a
    bare ModuleNotFoundError later, or advice about its model directory)."""
    import dataclasses

    from embedfill.providers.local import LocalProvider

    missing = dataclasses.replace(KINDS["local"], requires=requires)
    monkeypatch.setitem(KINDS, "local", missing)  # type: ignore[index]
    pconf = tickets_config(
        "http://127.0.0.1:9", providers={"l": {"kind": "local"}}, provider="l"
    ).providers["l"]
    said = "kind = 'local' needs the local extra: pip install 'embedfill\\[local\\]'"
    with pytest.raises(ConfigError, match=said):
        make_provider(pconf)
    with pytest.raises(ConfigError, match=said):
        LocalProvider(pconf)
