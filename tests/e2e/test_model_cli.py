"""`embedfill model …` from the command line, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg

from tests.support.cli import cli_env, embedfill, write_config

NOWHERE = "http://127.0.0.1:9"  # planning sends nothing
NEXT = """
[providers.next]
kind = "hash"
model = "hash-v2"
dimensions = 16

[providers.wide]
kind = "hash"
model = "hash-wide"
dimensions = 3072
"""


def slow_next(base_url: str) -> str:
    """Provider section "next" at the test server, 2 rows a request, one at a time, in
    5-row chunks: a fill slow enough to watch, or to kill, part-way."""
    return (
        '\n[providers.next]\nkind = "openai"\nmodel = "next-embed"\ndimensions = 16\n'
        f'base_url = "{base_url}"\napi_key_env = "TEST_PLATFORM_KEY"\n'
        "batch_size = 2\nmax_concurrency = 1\n\n[engine]\nchunk_rows = 5\nworker_chunks = 1\n"
    )


def test_model_plan_prints_the_plan_and_exits_2_with_one_sentence_on_a_refusal(
    tickets: str, tmp_path: Path
) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('CREATE INDEX ON app."SupportTickets" USING hnsw (emb vector_l2_ops)')
    path = write_config(tmp_path, NOWHERE, extra=NEXT)
    env = cli_env(tickets)

    def model(*args: str) -> tuple[int, str, str]:
        done = embedfill("--config", str(path), "model", *args, env=env)
        return done.returncode, done.stdout, done.stderr

    code, stdout, stderr = model("plan", "--target", "tickets", "--to", "next", "--json")
    assert code == 0, stderr
    out = json.loads(stdout)
    assert out["from"]["model"] == "test-embed" and out["to"]["dimensions"] == 16
    assert out["strategy"] == "table" and out["rows"] == 60
    assert [s["step"] for s in out["steps"]] == ["create", "fill", "index", "cutover", "finalize"]
    assert out["indexes"][0]["opclass"].endswith("vector_l2_ops")

    code, stdout, _ = model("plan", "--target", "tickets", "--to", "next", "--strategy", "column")
    assert code == 0
    assert "Strategy: column" in stdout and "emb_next" in stdout and "finalize" in stdout

    code, stdout, stderr = model("plan", "--target", "tickets", "--to", "wide")
    assert code == 2 and stdout == ""
    assert stderr.strip().count("\n") == 0 and "at most 2,000" in stderr


def test_model_start_fills_the_new_vectors_and_status_says_so(tickets: str, tmp_path: Path) -> None:
    path = write_config(tmp_path, NOWHERE, extra=NEXT)
    env = cli_env(tickets)

    def model(*args: str) -> tuple[int, str, str]:
        done = embedfill("--config", str(path), "model", *args, env=env)
        return done.returncode, done.stdout, done.stderr

    code, stdout, stderr = model("status", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["targets"][0]["phase"] == "none"
    code, stdout, stderr = model("start", "--target", "tickets", "--to", "next", "--json")
    assert code == 0, stderr
    out = json.loads(stdout)
    assert (out["phase"], out["coverage"], out["missing"], out["active"]) == (
        "ready",
        1.0,
        0,
        "old",
    )
    assert out["index"] == "none"  # the live column has no vector index: nor do the new ones
    code, stdout, _ = model("status", "--target", "tickets")
    assert code == 0 and "phase ready" in stdout and "coverage 100.00% of 60 rows" in stdout
    code, _, stderr = model("start", "--target", "tickets", "--to", "wide")
    assert code == 4 and "phase ready" in stderr and stderr.strip().count("\n") == 0


def test_model_verify_cutover_rollback_and_finalize_from_the_cli(
    tickets: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path, NOWHERE, extra=NEXT)
    env = cli_env(tickets)

    def model(*args: str) -> tuple[int, str, str]:
        done = embedfill("--config", str(path), "model", *args, "--target", "tickets", env=env)
        return done.returncode, done.stdout, done.stderr

    code, _, stderr = model("cutover")
    assert code == 2 and "No change of tickets's model is under way" in stderr
    code, stdout, _ = model("start", "--to", "next")
    assert code == 0 and "next: embedfill model verify --target tickets" in stdout
    code, _, stderr = model("cutover")
    assert code == 3 and "run `embedfill model verify" in stderr
    code, stdout, stderr = model("verify", "--json")
    assert code == 0, stderr
    gates = json.loads(stdout)["gates"]
    assert all(g["pass"] for g in gates.values()) and gates["coverage"]["value"] == 1.0
    code, stdout, _ = model("status")  # the text says what each gate measured, and what next
    assert "gate recall_at_10: n/a (threshold 0.95) pass; note: no vector index" in stdout
    assert "None" not in stdout and "next: embedfill model cutover --target tickets" in stdout
    code, stdout, _ = model("cutover", "--json")
    assert code == 0 and json.loads(stdout)["active"] == "new"
    code, stdout, _ = model("rollback")
    assert code == 0 and "searches use the old vectors" in stdout
    assert "next: embedfill model finalize --target tickets --yes drops the new vectors" in stdout
    code, _, stderr = model("finalize")
    assert code == 2 and "pass --yes" in stderr
    code, stdout, _ = model("finalize", "--yes", "--json")
    assert code == 0 and json.loads(stdout)["phase"] == "finalized"
    code, stdout, _ = model("status")  # what it dropped, not a coverage of 0 rows
    assert "finalized: dropped the new vectors (the side table app.SupportTickets_emb_next)" in (
        stdout
    )
    assert "coverage" not in stdout and "gate" not in stdout
    with psycopg.connect(tickets) as conn:
        assert conn.execute("SELECT to_regclass('app.\"SupportTickets_emb_next\"')").fetchone() == (
            None,
        )


def test_a_start_killed_during_its_index_build_leaves_the_build_and_a_rerun_waits_for_it(
    indexed: str, tmp_path: Path
) -> None:
    """kill -9 of `model start` while the server builds the index: the server's build
    goes on (its session holds the DDL lock until it ends); a rerun waits for it, drops
    nothing, and ends ready with one valid index."""
    import signal
    import time

    from tests.support.cli import popen

    path = write_config(tmp_path, NOWHERE, extra=NEXT)
    env = cli_env(indexed)
    side = 'app."SupportTickets_emb_next"'

    def builds(conn: psycopg.Connection[tuple[int]]) -> int:
        """Index builds under way that wait for the blocker's snapshot."""
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_progress_create_index"
            " WHERE phase = 'waiting for old snapshots'"
        ).fetchone()
        return int(row[0]) if row else 0

    with (
        psycopg.connect(indexed) as blocker,
        psycopg.connect(indexed, autocommit=True) as look,
    ):
        blocker.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        blocker.execute("SELECT count(*) FROM pg_class").fetchone()  # an old snapshot
        first = popen(
            "--config", str(path), "model", "start", "--target", "tickets", "--to", "next", env=env
        )
        for _ in range(400):
            if builds(look):
                break
            time.sleep(0.05)
        assert builds(look) == 1
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=10)  # closes its pipes too
        rerun = popen(
            "--config",
            str(path),
            "model",
            "start",
            "--target",
            "tickets",
            "--to",
            "next",
            "--json",
            env=env,
        )
        time.sleep(2)
        assert rerun.poll() is None  # waiting for the server's build
        assert builds(look) == 1  # which goes on: not dropped, not doubled
        blocker.rollback()
        out, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err
    status = json.loads(out)
    assert (status["phase"], status["index"]) == ("ready", "valid")
    with psycopg.connect(indexed) as conn:
        [(count,)] = conn.execute(
            "SELECT count(*) FROM pg_index WHERE indrelid = %s::regclass AND NOT indisprimary"
            " AND indisvalid",
            [side],
        ).fetchall()
    assert count == 1


def test_a_worker_elsewhere_takes_chunks_of_the_new_vectors_fill(
    tickets: str, fake_openai: Any, tmp_path: Path
) -> None:
    """`model start` fills the new vectors as a job; an `embedfill worker` with the same
    config, started before it, works on that job's chunks beside it."""
    import time

    from tests.support.cli import popen

    fake_openai.latency = 0.05
    path = write_config(tmp_path, NOWHERE, extra=slow_next(fake_openai.base_url))
    env = cli_env(tickets, TEST_PLATFORM_KEY="sk-platform-test-0000000000")
    assert embedfill("migrate", env=env).returncode == 0  # the schema, before the worker
    worker = popen("--config", str(path), "worker", env=env)
    try:
        time.sleep(2)  # alive and polling (it looks for changes of model when it starts)
        started = embedfill(
            "--config",
            str(path),
            "model",
            "start",
            "--target",
            "tickets",
            "--to",
            "next",
            "--json",
            env=env,
            timeout=180,
        )
        assert started.returncode == 0, started.stderr
        status = json.loads(started.stdout)
        assert (status["phase"], status["coverage"]) == ("ready", 1.0)
        with psycopg.connect(tickets) as conn:
            workers = conn.execute(
                "SELECT c.worker, count(*) FROM embedfill.chunks c"
                " JOIN embedfill.runs r ON r.id = c.run_id"
                " WHERE r.target = 'tickets@next' AND c.state = 'done' GROUP BY c.worker"
            ).fetchall()
    finally:
        worker.terminate()
        worker.communicate(timeout=60)
    # the worker elsewhere (its name is host:pid:…) did some of the chunks
    elsewhere = [n for name, n in workers if name.split(":")[1] == str(worker.pid)]
    assert elsewhere and elsewhere[0] > 0, workers


def test_a_start_killed_during_its_fill_goes_on_when_run_again_and_pays_little_twice(
    tickets: str, fake_openai: Any, tmp_path: Path
) -> None:
    """kill -9 of `model start` while it fills the new vectors: the same command again
    goes on from what was committed and ends ready; a text is sent again only if it was
    in flight or answered in the killed process's last moments."""
    import collections
    import signal
    import time

    from tests.support.cli import popen

    fake_openai.latency = 0.1
    path = write_config(tmp_path, NOWHERE, extra=slow_next(fake_openai.base_url))
    env = cli_env(tickets, TEST_PLATFORM_KEY="sk-platform-test-0000000000")
    side = 'app."SupportTickets_emb_next"'
    args = ("--config", str(path), "model", "start", "--target", "tickets", "--to", "next")

    def filled() -> int:
        with psycopg.connect(tickets) as conn:
            if conn.execute("SELECT to_regclass(%s)", [side]).fetchone() == (None,):
                return 0
            row = conn.execute(f"SELECT count(embedding) FROM {side}").fetchone()
        return int(row[0]) if row else 0

    first = popen(*args, env=env)
    deadline = time.monotonic() + 60
    while filled() < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert filled() >= 12
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=10)
    before = filled()
    assert before < 60  # killed mid-fill (60 rows)
    again = embedfill(*args, "--json", env=env, timeout=180)
    assert again.returncode == 0, again.stderr
    status = json.loads(again.stdout)
    assert (status["phase"], status["coverage"], status["missing"]) == ("ready", 1.0, 0)
    sent = collections.Counter(t for r in fake_openai.ok_requests() for t in r.inputs)
    assert max(sent.values()) <= 2
    twice = sum(1 for n in sent.values() if n == 2)
    # in flight (2) and answered in its last second (about 20 at 2 a 100 ms) at most
    assert twice <= 24, twice
    assert sum(sent.values()) == 60 + twice  # every text once, and those twice


def test_a_cutover_killed_at_any_point_leaves_the_old_state_or_the_new_never_a_mix(
    indexed: str, tmp_path: Path
) -> None:
    """kill -9 of `model cutover` at points spread over its run: each time, the change's
    phase and the record the app reads agree (ready, or rolled_back after an earlier
    try's cutover, and the live column; or cut_over and the side table); the same
    command again cuts over."""
    import signal
    import time

    from tests.support.cli import popen

    path = write_config(tmp_path, NOWHERE, extra=NEXT)
    env = cli_env(indexed)
    for step in ("start", "verify"):
        args = ("--config", str(path), "model", step, "--target", "tickets")
        done = embedfill(*args, *(("--to", "next") if step == "start" else ()), env=env)
        assert done.returncode == 0, done.stderr

    def state() -> tuple[str, str]:
        with psycopg.connect(indexed) as conn:
            phase = conn.execute(
                "SELECT phase FROM embedfill.model_migrations WHERE target = 'tickets'"
            ).fetchone()
            active = conn.execute(
                "SELECT relation FROM embedfill.active_models WHERE target = 'tickets'"
            ).fetchone()
        assert phase is not None
        return str(phase[0]), "SupportTickets" if active is None else str(active[0])

    cutover = ("--config", str(path), "model", "cutover", "--target", "tickets")
    outcomes = set()
    for delay in (0.3, 0.6, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4, 1.7, 2.2):
        proc = popen(*cutover, env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        phase, relation = state()
        assert (phase, relation) in {
            ("ready", "SupportTickets"),
            ("rolled_back", "SupportTickets"),  # a rollback of an earlier try's cutover
            ("cut_over", "SupportTickets_emb_next"),
        }, (delay, phase, relation)
        outcomes.add(phase)
        if phase == "cut_over":  # back to before, for the next try
            back = embedfill(
                "--config", str(path), "model", "rollback", "--target", "tickets", env=env
            )
            assert back.returncode == 0, back.stderr
            assert state() == ("rolled_back", "SupportTickets")
    assert outcomes & {"ready", "rolled_back"}  # some kills came before the commit
    done = embedfill(*cutover, env=env)
    assert done.returncode == 0, done.stderr
    assert state() == ("cut_over", "SupportTickets_emb_next")


def test_a_finalize_killed_while_it_waits_has_dropped_nothing_and_runs_again(
    indexed: str, tmp_path: Path
) -> None:
    """The finalize drops the live column and records the change finalized in one
    transaction. Killed (-9) while it waits to record it (a drain, here a session, holds
    the change's row), it has dropped nothing: the column is there, the change at
    cut_over, and the same command again finalizes. Before (helper-32), the column was
    dropped first, the change stayed at cut_over, and every command then refused it for
    the missing column, with no way forward."""
    import signal
    import time

    from tests.support.cli import popen

    path = write_config(tmp_path, NOWHERE, extra=NEXT)
    env = cli_env(indexed)
    for step in (("start", "--to", "next"), ("verify",), ("cutover",)):
        done = embedfill("--config", str(path), "model", step[0], "--target", "tickets",
                         *step[1:], env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr

    def state() -> tuple[str, int]:
        with psycopg.connect(indexed) as conn:
            phase = conn.execute("SELECT phase FROM embedfill.model_migrations").fetchone()
            emb = conn.execute(
                "SELECT count(*) FROM pg_attribute WHERE attrelid = 'app.\"SupportTickets\"'"
                "::regclass AND attname = 'emb' AND NOT attisdropped"
            ).fetchone()
        assert phase is not None and emb is not None
        return str(phase[0]), int(emb[0])

    finalize = ("--config", str(path), "model", "finalize", "--target", "tickets", "--yes")
    with psycopg.connect(indexed) as holder:
        holder.execute("SELECT 1 FROM embedfill.model_migrations FOR SHARE").fetchall()
        proc = popen(*finalize, env=env)
        time.sleep(3.0)  # several tries, each refused within its lock_timeout
        assert state() == ("cut_over", 1)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    assert state() == ("cut_over", 1)
    # a rollback while a finalize waits: the finalize drops nothing, and says why
    with psycopg.connect(indexed) as holder:
        holder.execute("SELECT 1 FROM embedfill.model_migrations FOR UPDATE").fetchall()
        proc = popen(*finalize, env=env)
        time.sleep(1.5)
        holder.execute("UPDATE embedfill.model_migrations SET phase = 'rolled_back'")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stderr
    assert "went to phase rolled_back while this finalize waited" in stderr
    assert state() == ("rolled_back", 1)
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute("UPDATE embedfill.model_migrations SET phase = 'cut_over'")
    done = embedfill(*finalize, env=env)
    assert done.returncode == 0, done.stderr
    assert state() == ("finalized", 0)


def test_the_same_width_trap_status_counts_the_live_vectors_outdated_only_after_cutover(
    tickets: str, fake_openai: Any, tmp_path: Path
) -> None:
    """A change between two models of one width (8 → 8): nothing in the column's type
    tells them apart. Before the cutover the live vectors are the ones searched (0
    outdated); from the cutover until a rollback every vector embedfill wrote there is of
    the model no longer searched, and `status` counts each as outdated_model, saying why.
    Expected, not an incident: `check` passes and the stale alert leaves it out."""
    same = '\n[providers.same]\nkind = "hash"\nmodel = "hash-same-width"\ndimensions = 8\n'
    path = write_config(tmp_path, fake_openai.base_url, extra=same)
    env = cli_env(tickets, TEST_PLATFORM_KEY="sk-test-platform-0123456789")

    def run(*args: str) -> tuple[int, str, str]:
        done = embedfill("--config", str(path), *args, env=env)
        return done.returncode, done.stdout, done.stderr

    def status() -> dict[str, Any]:
        code, stdout, stderr = run("status", "--target", "tickets", "--json")
        assert code == 0, stderr
        (target,) = json.loads(stdout)["targets"]
        return dict(target)

    assert run("backfill")[0] == 0
    assert (status()["outdated_model"], status()["unverified"]) == (0, 15)
    code, _, stderr = run("model", "start", "--target", "tickets", "--to", "same")
    assert code == 0, stderr
    assert run("model", "verify", "--target", "tickets")[0] == 0
    before = status()
    assert before["outdated_model"] == 0 and "cut_over_to" not in before

    assert run("model", "cutover", "--target", "tickets")[0] == 0
    after = status()
    assert (after["outdated_model"], after["stale"], after["unverified"]) == (45, 0, 15)
    assert after["cut_over_to"] == "hash:hash-same-width (8 dimensions)"
    code, stdout, _ = run("status", "--target", "tickets")
    said = " ".join(stdout.split())
    assert "45 outdated model" in said
    assert "cut over to hash:hash-same-width (8 dimensions): the app searches the new" in said
    assert "`embedfill model rollback --target tickets`" in said
    code, stdout, _ = run("check", "--target", "tickets", "--max-stale", "0", "--max-missing", "0")
    assert code == 0, stdout  # kept for a rollback on purpose: no bound is over
    assert "cut over to hash:hash-same-width" in stdout
    # rows edited since (no watch running) are stale, not hidden among the outdated:
    # the searched vectors of their old text are stale too, and check sees them
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            "UPDATE app.\"SupportTickets\" SET body = body || ' edited'"
            " WHERE ticket_no IN (1, 2, 3)"
        )
    edited = status()
    assert (edited["stale"], edited["outdated_model"], edited["unverified"]) == (3, 42, 15)
    code, stdout, _ = run("check", "--target", "tickets", "--max-stale", "0", "--max-missing", "0")
    assert code == 3 and "3 stale" in stdout, stdout

    assert run("model", "rollback", "--target", "tickets")[0] == 0
    back = status()
    assert (back["outdated_model"], back["stale"]) == (0, 3) and "cut_over_to" not in back
