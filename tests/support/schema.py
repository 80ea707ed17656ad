"""embedfill's schema set back, as an earlier release left it (tests of upgrades)."""

from __future__ import annotations

from typing import Any

import psycopg


def undo_0007(conn: psycopg.Connection[Any]) -> None:
    """What migration 0007 (job specs, leases per holder, rings, tallies) added, gone (and
    0008's failure retries)."""
    conn.execute("DELETE FROM embedfill.schema_version WHERE version >= 7")
    conn.execute("DROP INDEX embedfill.failures_run_row")
    conn.execute(
        "ALTER TABLE embedfill.failures DROP COLUMN text_md5, DROP COLUMN retry_at,"
        " DROP COLUMN key_digest, DROP COLUMN tries"
    )
    conn.execute("DROP TABLE embedfill.tallies")
    conn.execute("ALTER TABLE embedfill.runs DROP COLUMN kind, DROP COLUMN spec")
    conn.execute("ALTER TABLE embedfill.workers DROP COLUMN refused")
    conn.execute("DROP INDEX embedfill.chunks_doing_worker")
    conn.execute(
        "ALTER TABLE embedfill.chunks DROP COLUMN heartbeat_at, DROP COLUMN lease_s,"
        " DROP COLUMN rung_at"
    )
