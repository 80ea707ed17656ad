"""`embedfill model …` from the command line, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

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
