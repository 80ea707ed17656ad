"""The baseline: what a developer writes by hand during an incident.

Rows grouped by tenant, batches of 50, one synchronous OpenAI SDK call per batch, one
UPDATE per row, one transaction per batch. Kept as the reference embedfill must beat.
"""

from __future__ import annotations

import os

import openai
import psycopg
from pgvector.psycopg import register_vector


def naive_backfill(url: str, base_url: str, model: str, api_key: str, limit: int) -> int:
    client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=2)
    done = 0
    with psycopg.connect(url) as conn:
        register_vector(conn)
        rows = conn.execute(
            "SELECT id, tenant, body FROM docs WHERE embedding IS NULL ORDER BY tenant, id "
            "LIMIT %s",
            (limit,),
        ).fetchall()
        by_tenant: dict[str, list[tuple[int, str]]] = {}
        for row_id, tenant, body in rows:
            by_tenant.setdefault(tenant, []).append((row_id, body))
        for items in by_tenant.values():
            for start in range(0, len(items), 50):
                batch = items[start : start + 50]
                resp = client.embeddings.create(model=model, input=[b for _, b in batch])
                with conn.transaction():
                    for (row_id, _), item in zip(batch, resp.data, strict=True):
                        conn.execute(
                            "UPDATE docs SET embedding = %s::vector WHERE id = %s",
                            (str(item.embedding), row_id),
                        )
                done += len(batch)
    return done


if __name__ == "__main__":
    print(
        naive_backfill(
            os.environ["DATABASE_URL"],
            os.environ["OPENAI_BASE_URL"],
            "text-embedding-3-small",
            "sk-bench",
            100,
        )
    )
