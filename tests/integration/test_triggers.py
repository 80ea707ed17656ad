"""Change triggers (`embedfill triggers install|uninstall`) against a real PostgreSQL: what
they queue, that the application's writes never fail because of them (a role without
rights on embedfill's schema, a dropped queue, a migration holding the queue's lock, a
10k-row statement), the privileges install needs, and that --print-sql is what runs."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import psycopg
import pytest

from embedfill import BackfillOptions, Database, abackfill
from embedfill.application import atriggers
from embedfill.config import TableName
from embedfill.db.schema import EXPECTED_VERSION, amigrate
from embedfill.errors import PrivilegeMissing
from tests.support.cli import cli_env, embedfill, write_config
from tests.support.fake_openai import FakeOpenAI
from tests.support.roles import Roles
from tests.support.schema import undo_0007
from tests.support.tables import tickets_config

T = 'app."SupportTickets"'
APP_GRANTS = (
    "GRANT USAGE ON SCHEMA app TO {role}",
    'GRANT SELECT, INSERT, UPDATE ON app."SupportTickets" TO {role}',
)
NOWHERE = "http://127.0.0.1:9"  # no request is made by these commands


def triggers(url: str, config: Any, *, install: bool = True, print_sql: bool = False) -> Any:
    return asyncio.run(atriggers(config, Database(url), None, install, print_sql))


def installed(url: str) -> Any:
    """(trigger names on the table, functions named changed_* in embedfill's schema)."""
    with psycopg.connect(url) as conn:
        names = conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND NOT tgisinternal"
            " ORDER BY 1",
            (T,),
        ).fetchall()
        funcs = conn.execute(
            "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'embedfill' AND p.proname LIKE 'changed%' ORDER BY 1"
        ).fetchall()
    return [r[0] for r in names], [r[0] for r in funcs]


def queued(url: str) -> list[tuple[int, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT column_id, row_key FROM embedfill.changes").fetchall()
    return sorted(rows, key=lambda r: (r[0], int(r[1])))


def clear(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM embedfill.changes")


def insert(url: str, first: int, n: int = 1) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {T} (ticket_no, org, subject, body)"
            " SELECT i, 'org-a', 'new', 'row ' || i FROM generate_series(%s::bigint, %s) i",
            (first, first + n - 1),
        )


@pytest.fixture
def migrated(tickets: str) -> str:
    asyncio.run(amigrate(Database(tickets)))
    return tickets


def test_the_queue_gets_exactly_the_changed_rows_and_no_notification(migrated: str) -> None:
    url, config = migrated, tickets_config(NOWHERE)
    plan, _ = triggers(url, config)
    col = plan.column_id
    assert installed(url) == (
        [f"embedfill_changed_{col}_ins", f"embedfill_changed_{col}_upd"],
        [f"changed_{col}", f"changed_{col}_rows"],
    )
    with psycopg.connect(url) as conn:  # the same number provenance uses
        ids = conn.execute("SELECT id FROM embedfill.vector_columns").fetchall()
    assert ids == [(col,)]

    listener = psycopg.connect(url, autocommit=True)
    listener.execute("LISTEN embedfill_changes")
    insert(url, 101, 2)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"UPDATE {T} SET body = body || ' (edited)' WHERE ticket_no IN (1, 2)")
        conn.execute(f"UPDATE {T} SET subject = 'new subject' WHERE ticket_no = 3")
        conn.execute(f"UPDATE {T} SET body = body, subject = subject WHERE ticket_no <= 10")
        conn.execute(f"UPDATE {T} SET org = 'org-b' WHERE ticket_no = 5")  # not in the text
        conn.execute(f"UPDATE {T} SET emb = '[1,2,3,4,5,6,7,8]' WHERE ticket_no = 6")
        conn.execute(f"UPDATE {T} SET body = NULL WHERE ticket_no = 7")  # text to NULL
        conn.execute(f"UPDATE {T} SET body = NULL WHERE ticket_no = 7")  # NULL to NULL
    assert queued(url) == [(col, k) for k in ("1", "2", "3", "7", "101", "102")]
    # a notifying commit holds a cluster-wide lock until its WAL is flushed: the app's
    # commits would wait for each other, and fail when the NOTIFY queue is full
    got = list(listener.notifies(timeout=1, stop_after=1))
    listener.close()
    assert got == []


def test_a_watch_process_sees_queued_changes_within_a_fraction_of_a_second(
    migrated: str,
) -> None:
    from embedfill.watch import CHANGES_POLL_S, WatchHub

    plan, _ = triggers(migrated, tickets_config(NOWHERE))

    async def seen_after() -> tuple[float, bool]:
        hub = WatchHub(Database(migrated))
        try:
            await hub.open()
            mine, other = hub.changes(plan.column_id), hub.changes(plan.column_id + 1)
            await asyncio.sleep(3 * CHANGES_POLL_S)
            assert not mine.is_set() and not other.is_set()  # nothing queued yet
            mine.clear()
            insert(migrated, 201)  # the trigger queues it; nothing notifies
            started = time.monotonic()
            await asyncio.wait_for(mine.wait(), timeout=5)
            return time.monotonic() - started, other.is_set()
        finally:
            await hub.close()

    seconds, other_woken = asyncio.run(seen_after())
    assert seconds < 1.0  # a watcher's own look at its queue comes only every second
    assert not other_woken  # a column with nothing queued is not woken


def test_embedfill_own_writes_queue_nothing(migrated: str, fake_openai: FakeOpenAI) -> None:
    config = tickets_config(fake_openai.base_url)
    triggers(migrated, config)

    def backfill(**opts: Any) -> Any:
        env = {"TEST_PLATFORM_KEY": "sk-platform-0123456789"}
        return asyncio.run(abackfill(config, Database(migrated), BackfillOptions(**opts), env=env))

    assert backfill().embedded == 45
    assert queued(migrated) == []
    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute(f"UPDATE {T} SET body = 'edited' WHERE ticket_no IN (1, 2, 3)")
    assert len(queued(migrated)) == 3
    clear(migrated)
    assert backfill(refresh=True).refreshed == 3  # a refresh rewrites the vector in place
    assert queued(migrated) == []


def test_an_app_role_without_rights_on_embedfills_schema_writes_and_is_queued(
    migrated: str, roles: Roles
) -> None:
    plan, _ = triggers(migrated, tickets_config(NOWHERE))
    app = roles.create()
    roles.grant(app, *APP_GRANTS)
    app_url = roles.url(app)
    with psycopg.connect(app_url, autocommit=True) as conn:
        row = conn.execute("SELECT has_schema_privilege('embedfill', 'USAGE')").fetchone()
        assert row == (False,)
        conn.execute(f"INSERT INTO {T} (ticket_no, org, subject, body) VALUES (200, 'o', 's', 'b')")
        conn.execute(f"UPDATE {T} SET body = 'changed' WHERE ticket_no = 4")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT 1 FROM embedfill.changes")
    assert queued(migrated) == [(plan.column_id, "4"), (plan.column_id, "200")]


def test_a_dropped_queue_never_breaks_the_apps_writes(migrated: str, roles: Roles) -> None:
    triggers(migrated, tickets_config(NOWHERE))
    app = roles.create()
    roles.grant(app, *APP_GRANTS)
    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute("DROP TABLE embedfill.changes")
    insert(roles.url(app), 301, 50)
    with psycopg.connect(roles.url(app), autocommit=True) as conn:
        conn.execute(f"UPDATE {T} SET body = 'x' WHERE ticket_no <= 60")
        row = conn.execute(f"SELECT count(*) FROM {T} WHERE ticket_no >= 300").fetchone()
    assert row == (50,)


def test_a_10k_row_statement_is_queued_whole(migrated: str) -> None:
    plan, _ = triggers(migrated, tickets_config(NOWHERE))
    with psycopg.connect(migrated) as conn:  # one transaction
        conn.execute(
            f"INSERT INTO {T} (ticket_no, org, subject, body)"
            " SELECT i, 'org-a', 's', 'b' FROM generate_series(1001, 11000) i"
        )
        conn.execute(f"UPDATE {T} SET body = 'edited' WHERE ticket_no > 1000")
        conn.commit()
    with psycopg.connect(migrated) as conn:
        rows = conn.execute(
            "SELECT column_id, count(*), count(DISTINCT row_key), min(row_key::int),"
            " max(row_key::int) FROM embedfill.changes GROUP BY 1"
        ).fetchall()
    assert rows == [(plan.column_id, 20_000, 10_000, 1001, 11000)]  # an insert, an update


class AppWriter(threading.Thread):
    """The application: single-row inserts in autocommit until stopped; every failure kept."""

    def __init__(self, url: str, first: int) -> None:
        super().__init__(daemon=True)
        self.url, self.next, self.first = url, first, first
        self.stop, self.errors = threading.Event(), list[str]()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                try:
                    conn.execute(
                        f"INSERT INTO {T} (ticket_no, org, subject, body)"
                        " VALUES (%s, 'org-a', 's', 'b')",
                        (self.next,),
                    )
                    conn.execute(f"UPDATE {T} SET body = 'c' WHERE ticket_no = %s", (self.next,))
                    self.next += 1
                except psycopg.Error as exc:
                    self.errors.append(str(exc))
                    self.next += 1

    @property
    def written(self) -> int:
        return self.next - self.first


def test_app_writes_wait_for_a_migration_holding_the_queue_and_never_fail(migrated: str) -> None:
    triggers(migrated, tickets_config(NOWHERE))
    apps = [AppWriter(migrated, 10_000 * (k + 1)) for k in range(3)]
    for a in apps:
        a.start()
    time.sleep(0.3)
    with psycopg.connect(migrated) as conn:  # ACCESS EXCLUSIVE on the queue for a while
        conn.execute("ALTER TABLE embedfill.changes ADD COLUMN note text")
        conn.execute("ALTER TABLE embedfill.changes ALTER COLUMN row_key TYPE varchar")
        time.sleep(1.0)
        conn.commit()
    time.sleep(0.3)
    for a in apps:
        a.stop.set()
        a.join(timeout=30)
    assert [a.errors for a in apps] == [[], [], []]
    assert all(a.written > 0 for a in apps)
    with psycopg.connect(migrated) as conn:
        row = conn.execute("SELECT count(*) FROM embedfill.changes").fetchone()
    assert row == (sum(2 * a.written for a in apps),)  # nothing lost meanwhile


def _back_to_version_5(url: str) -> None:
    """As if this database had been migrated by the release before provenance (0006)."""
    with psycopg.connect(url, autocommit=True) as conn:
        undo_0007(conn)
        conn.execute("DELETE FROM embedfill.schema_version WHERE version >= 6")
        conn.execute(
            "DROP TABLE embedfill.changes, embedfill.provenance, embedfill.models,"
            " embedfill.vector_columns"
        )
        conn.execute("ALTER TABLE embedfill.chunks DROP COLUMN keys")


def test_app_writes_never_fail_during_a_real_embedfill_migrate(migrated: str) -> None:
    plan, _ = triggers(migrated, tickets_config(NOWHERE))
    _back_to_version_5(migrated)
    apps = [AppWriter(migrated, 10_000 * (k + 1)) for k in range(3)]
    for a in apps:
        a.start()
    time.sleep(0.3)
    assert asyncio.run(amigrate(Database(migrated))) == (5, EXPECTED_VERSION)
    time.sleep(0.3)
    for a in apps:
        a.stop.set()
        a.join(timeout=30)
    assert [a.errors for a in apps] == [[], [], []]
    # the rows written while the queue was gone were not queued; once it is back, they are
    clear(migrated)
    insert(migrated, 99_000)
    assert queued(migrated) == [(plan.column_id, "99000")]


def test_text_sql_target_watches_every_column_but_the_embedding(migrated: str) -> None:
    base = tickets_config(NOWHERE)
    target = dataclasses.replace(base.targets[0], text=None, text_sql="subject || ' ' || body")
    config = dataclasses.replace(base, targets=(target,))
    _, script = triggers(migrated, config, print_sql=True)
    assert 'on UPDATE when one of "ticket_no", "org", "subject", "body" changed' in script
    assert "columns added to the table later are not covered" in script
    plan, _ = triggers(migrated, config)
    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute(f"UPDATE {T} SET org = 'org-z' WHERE ticket_no = 8")
        conn.execute(f"UPDATE {T} SET emb = '[1,1,1,1,1,1,1,1]' WHERE ticket_no = 9")
        conn.execute(f"UPDATE {T} SET org = org WHERE ticket_no = 10")
    assert queued(migrated) == [(plan.column_id, "8")]


def test_print_sql_changes_nothing_and_is_exactly_what_install_and_uninstall_run(
    migrated: str,
) -> None:
    config = tickets_config(NOWHERE)
    first, script = triggers(migrated, config, print_sql=True)
    assert first.column_id is None and '"embedfill"."changed_N"()' in script
    assert installed(migrated) == ([], [])
    with psycopg.connect(migrated) as conn:
        assert conn.execute("SELECT count(*) FROM embedfill.vector_columns").fetchone() == (0,)

    plan, ran = triggers(migrated, config)
    assert "side table" not in ran  # its vectors are on the table the triggers go on
    again, ran_again = triggers(migrated, config)  # idempotent
    assert ran_again == ran and again.column_id == plan.column_id
    _, printed = triggers(migrated, config, print_sql=True)
    assert printed == ran
    assert len(installed(migrated)[0]) == 2

    _, printed_un = triggers(migrated, config, install=False, print_sql=True)
    assert len(installed(migrated)[0]) == 2  # printing removed nothing
    _, ran_un = triggers(migrated, config, install=False)
    assert ran_un == printed_un and installed(migrated) == ([], [])
    nothing, _ = triggers(migrated, config, install=False)
    assert nothing.statements == []

    # the printed script, reviewed and run by hand, installs the same working triggers
    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute(printed.encode())
    insert(migrated, 500)
    assert queued(migrated) == [(plan.column_id, "500")]


def test_install_needs_its_privileges_and_leaves_nothing_half_done(
    migrated: str, roles: Roles
) -> None:
    config = tickets_config(NOWHERE)
    role = roles.create()
    roles.grant(
        role,
        "GRANT USAGE ON SCHEMA app TO {role}",
        'GRANT SELECT ON app."SupportTickets" TO {role}',
        "GRANT USAGE ON SCHEMA embedfill TO {role}",
        "GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA embedfill TO {role}",
        "GRANT USAGE ON ALL SEQUENCES IN SCHEMA embedfill TO {role}",
    )
    url = roles.url(role)
    with pytest.raises(PrivilegeMissing) as info:  # no TRIGGER on the table
        triggers(url, config)
    assert info.value.exit_code == 5
    assert 'may not create triggers on "app"."SupportTickets"' in str(info.value)
    assert 'GRANT TRIGGER ON "app"."SupportTickets"' in str(info.value)

    roles.grant(role, 'GRANT TRIGGER ON app."SupportTickets" TO {role}')
    with pytest.raises(PrivilegeMissing) as info:  # no CREATE on embedfill's schema
        triggers(url, config)
    assert "may not create functions in schema embedfill" in str(info.value)

    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute("REVOKE INSERT ON embedfill.changes FROM PUBLIC")
    roles.grant(
        role,
        "GRANT CREATE ON SCHEMA embedfill TO {role}",
        "REVOKE INSERT ON embedfill.changes FROM {role}",
    )
    with pytest.raises(PrivilegeMissing) as info:  # its trigger could queue nothing
        triggers(url, config)
    assert "may not insert into embedfill.changes" in str(info.value)
    assert installed(migrated) == ([], [])
    with psycopg.connect(migrated) as conn:
        assert conn.execute("SELECT count(*) FROM embedfill.vector_columns").fetchone() == (0,)

    roles.grant(role, "GRANT INSERT ON embedfill.changes TO {role}")
    triggers(url, config)  # TRIGGER is enough to install (and replace)
    triggers(url, config)
    with pytest.raises(PrivilegeMissing) as info:  # but dropping needs the table's owner
        triggers(url, config, install=False)
    assert "may not drop triggers" in str(info.value)
    assert len(installed(migrated)[0]) == 2
    triggers(migrated, config, install=False)  # the owner may
    assert installed(migrated) == ([], [])


def test_cli_install_print_sql_and_exit_5(migrated: str, roles: Roles, tmp_path: Any) -> None:
    cfg = write_config(tmp_path, NOWHERE)
    env = cli_env(migrated)
    printed = embedfill(
        "--config", str(cfg), "triggers", "install", "--target", "tickets", "--print-sql", env=env
    )
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.startswith("-- embedfill triggers install --target tickets")
    assert "CREATE OR REPLACE TRIGGER" in printed.stdout and installed(migrated) == ([], [])
    done = embedfill("--config", str(cfg), "triggers", "install", "--target", "tickets", env=env)
    assert done.returncode == 0, done.stderr
    assert "installed change triggers embedfill_changed_1_ins, embedfill_changed_1_upd" in (
        done.stdout
    )
    role = roles.create()
    roles.grant(role, *APP_GRANTS)
    denied = embedfill(
        "--config",
        str(cfg),
        "triggers",
        "uninstall",
        "--target",
        "tickets",
        env=cli_env(roles.url(role)),
    )
    assert denied.returncode == 5, denied.stderr
    assert "permission denied for schema embedfill" in denied.stderr
    gone = embedfill("--config", str(cfg), "triggers", "uninstall", "--target", "tickets", env=env)
    assert gone.returncode == 0 and "removed change triggers" in gone.stdout
    assert installed(migrated) == ([], [])


# ------------------------------------------------ issue 15, item 3: the app's schema changes


def test_the_apps_alter_table_on_any_column_goes_through_and_its_writes_go_on(
    migrated: str,
) -> None:
    """Django's AlterField on a text column gave "cannot alter type of a column used in a
    trigger definition". With the triggers installed, every ALTER of a column succeeds,
    and one long-lived app session (a pooled connection: plans cached before the change)
    goes on writing after each; rows are queued while the id and a text column remain."""
    config = tickets_config(NOWHERE)
    plan, _ = triggers(migrated, config)
    col = plan.column_id
    with (
        psycopg.connect(migrated, autocommit=True) as app,
        psycopg.connect(migrated, autocommit=True) as ddl,
    ):

        def update(no: int, subject: str) -> None:
            app.execute(f"UPDATE {T} SET subject = %s WHERE ticket_no = %s", (subject, no))

        def add(no: int) -> None:
            app.execute(
                f"INSERT INTO {T} (ticket_no, org, subject) VALUES (%s, 'org-a', 'x')", (no,)
            )

        update(1, "warm the cached plans")
        add(5001)
        assert queued(migrated) == [(col, "1"), (col, "5001")]
        clear(migrated)

        ddl.execute(f"ALTER TABLE {T} ALTER COLUMN subject TYPE varchar(200)")  # AlterField
        update(2, "after a type change")
        add(5002)
        assert queued(migrated) == [(col, "2"), (col, "5002")]
        clear(migrated)

        ddl.execute(f"ALTER TABLE {T} RENAME COLUMN body TO body_text")
        update(3, "a watched column renamed")
        add(5003)
        ddl.execute(f"ALTER TABLE {T} RENAME COLUMN body_text TO body")
        update(4, "renamed back")
        # the subject is still there: its change is still seen, with a column gone
        assert queued(migrated) == [(col, "3"), (col, "4"), (col, "5003")]
        clear(migrated)

        ddl.execute(f"ALTER TABLE {T} RENAME COLUMN ticket_no TO no")
        app.execute(f"UPDATE {T} SET subject = 'id renamed' WHERE no = 5")
        app.execute(f"INSERT INTO {T} (no, org, subject) VALUES (5004, 'org-a', 'x')")
        assert queued(migrated) == []  # nothing to name the row by: not queued, no error
        ddl.execute(f"ALTER TABLE {T} RENAME COLUMN no TO ticket_no")

        ddl.execute(f"ALTER TABLE {T} ALTER COLUMN ticket_no TYPE numeric")
        ddl.execute(f"ALTER TABLE {T} ALTER COLUMN emb TYPE vector(8)")
        ddl.execute(f"ALTER TABLE {T} DROP COLUMN body")
        update(6, "a watched column dropped")
        add(5005)
        assert queued(migrated) == [(col, "6"), (col, "5005")]
        clear(migrated)
        ddl.execute(f"ALTER TABLE {T} DROP COLUMN emb")
        update(7, "the vector column dropped")
        ddl.execute(f"ALTER TABLE {T} DROP COLUMN subject")
        app.execute(f"UPDATE {T} SET org = 'org-b' WHERE ticket_no = 8")
        add_row = f"INSERT INTO {T} (ticket_no, org) VALUES (5006, 'org-a')"
        app.execute(add_row)
        assert (col, "7") in queued(migrated) and (col, "5006") in queued(migrated)
        assert (col, "8") not in queued(migrated)  # no watched column left to change


def test_a_partitioned_table_queues_inserts_made_straight_into_a_partition(
    migrated: str,
) -> None:
    """Item 11: only UPDATEs of rows inserted straight into a partition were queued."""
    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE app.events (id bigint PRIMARY KEY, org text NOT NULL, subject text,"
            " body text, emb vector(8)) PARTITION BY RANGE (id)"
        )
        conn.execute(
            "CREATE TABLE app.events_a PARTITION OF app.events FOR VALUES FROM (0) TO (10)"
        )
        conn.execute(
            "CREATE TABLE app.events_b PARTITION OF app.events FOR VALUES FROM (10) TO (20)"
        )
    base = tickets_config(NOWHERE)
    target = dataclasses.replace(
        base.targets[0], table=TableName(schema="app", name="events"), id_column="id"
    )
    config = dataclasses.replace(base, targets=(target,))
    plan, _ = triggers(migrated, config)
    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute("INSERT INTO app.events (id, org, subject) VALUES (1, 'a', 'via parent')")
        conn.execute("INSERT INTO app.events_b (id, org, subject) VALUES (12, 'b', 'direct')")
        conn.execute(
            "INSERT INTO app.events_a (id, org, subject) SELECT g, 'a', 's'"
            " FROM generate_series(3, 4) g"
        )
        conn.execute(
            "CREATE TABLE app.events_c PARTITION OF app.events FOR VALUES FROM (20) TO (30)"
        )
        conn.execute("INSERT INTO app.events_c (id, org, subject) VALUES (25, 'c', 'later')")
        conn.execute("UPDATE app.events_b SET subject = 'edited' WHERE id = 12")
    assert queued(migrated) == [(plan.column_id, k) for k in ("1", "3", "4", "12", "12", "25")]
