"""verify.py's pure decisions (sample plan, cosine, results), the verify_min_cosine
setting, and the verify/adopt SQL for odd identifiers."""

from __future__ import annotations

import math

import numpy as np
import psycopg
import pytest

from embedfill.config import Config, parse_config
from embedfill.db.target_sql import ColumnTypes, TargetSQL
from embedfill.errors import ConfigError, UsageError
from embedfill.models import Row
from embedfill.verify import (
    DEFAULT_SAMPLE,
    VerifyResult,
    agrees,
    cosine,
    refusal,
    sample_percents,
    sample_size,
)

f32 = np.float32


def vec(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=f32)


@pytest.mark.parametrize(
    ("wanted", "pages", "expected"),
    [
        (100, 0, [100.0]),  # never analysed: read it all
        (100, 1_000, [100.0]),  # 400 of 1,000 pages: a share that big reads all
        (100, 2_000, [100.0]),  # exactly the 20% bound
        (100, 1_000_000, [0.04, 100.0]),  # 400 pages of a million, else all
        (1, 100, [4.0, 100.0]),
    ],
)
def test_sample_percents(wanted: int, pages: int, expected: list[float]) -> None:
    assert sample_percents(wanted, pages) == pytest.approx(expected)


def test_sample_size_choices() -> None:
    assert sample_size(None, False) == DEFAULT_SAMPLE == 100
    assert sample_size(7, False) == 7
    assert sample_size(None, True) is None
    with pytest.raises(UsageError, match="not both"):
        sample_size(5, True)
    for bad in (0, -3):
        with pytest.raises(UsageError, match="at least 1"):
            sample_size(bad, False)


def test_cosine() -> None:
    assert cosine(vec(1, 0), vec(2, 0)) == pytest.approx(1.0)
    assert cosine(vec(1, 0), vec(0, 3)) == pytest.approx(0.0)
    assert cosine(vec(1, 1), vec(-1, -1)) == pytest.approx(-1.0)
    big = vec(3e38, 3e38)  # float32's range: computed in float64, no overflow
    assert cosine(big, vec(1, 1)) == pytest.approx(1.0)
    # not defined: the stored vector cannot be shown to agree
    assert cosine(None, vec(1, 0)) is None
    assert cosine(vec(0, 0), vec(1, 0)) is None
    assert cosine(vec(1, 0), vec(0, 0)) is None
    assert cosine(vec(1, 0, 0), vec(1, 0)) is None
    assert cosine(vec(math.nan, 0), vec(1, 0)) is None
    assert cosine(vec(1, 0), vec(math.inf, 0)) is None


def test_agrees() -> None:
    assert agrees(0.99, 0.99) and agrees(1.0, 0.99)
    assert not agrees(0.9899, 0.99) and not agrees(None, 0.99) and not agrees(-1.0, 0.5)


def row(i: int, tenant: str = "t1") -> Row:
    return Row(id=i, tenant=tenant, text=f"text {i}", key=b"")


def test_result_records_mismatches_and_exit_code() -> None:
    r = VerifyResult(target="tickets", provider="openai:m", threshold=0.99, sample=10)
    r.record(row(1), 0.9999)
    assert r.ok and r.exit_code == 0 and r.min_cosine == pytest.approx(0.9999)
    r.record(row(2, "t2"), None)
    assert r.min_cosine == pytest.approx(0.9999)  # only defined cosines
    r.record(row(3), 0.5)
    assert r.exit_code == 3 and r.checked == 3 and r.min_cosine == 0.5
    data = r.to_dict()
    assert data["mismatched"] == [
        {"id": 2, "tenant": "t2", "cosine": None},
        {"id": 3, "tenant": "t1", "cosine": 0.5},
    ]
    assert {t["tenant"]: t["mismatched"] for t in data["tenants"]} == {"t1": 1, "t2": 1}
    assert "2 of 3 sampled vectors" in refusal(r) and "3 (tenant t1, cosine 0.5000)" in refusal(r)
    assert "2 (tenant t2, cosine undefined)" in refusal(r)

    failing = VerifyResult(target="tickets", provider="openai:m", threshold=0.99, sample=10)
    failing.fail([row(4)], "no API key")
    assert failing.exit_code == 3 and failing.to_dict()["failures"][0]["id"] == 4
    assert "could not be re-embedded (row 4, tenant t1: no API key)" in refusal(failing)


def config(**provider: object) -> Config:
    return parse_config(
        {
            "providers": {"p": {"kind": "hash", "dimensions": 3, **provider}},
            "targets": [
                {
                    "name": "t",
                    "table": "x",
                    "id_column": "id",
                    "text": "{a}",
                    "embedding_column": "e",
                    "provider": "p",
                }
            ],
        }
    )


def test_verify_min_cosine_setting() -> None:
    assert config().providers["p"].verify_min_cosine == 0.99
    assert config(verify_min_cosine=1).providers["p"].verify_min_cosine == 1.0
    assert config(verify_min_cosine=0.5).providers["p"].verify_min_cosine == 0.5
    for bad in (0, -0.1, 1.01, math.nan):
        with pytest.raises(ConfigError, match=r"'verify_min_cosine' in \[providers\.p\] must be"):
            config(verify_min_cosine=bad)
    for bad in ("0.9", True):
        with pytest.raises(ConfigError, match="must be a number"):
            config(verify_min_cosine=bad)


@pytest.fixture(scope="module")
def conn(server_url: str):  # type: ignore[no-untyped-def]
    with psycopg.connect(server_url) as c:
        yield c


def test_verify_and_adopt_sql_quotes_odd_identifiers(conn: psycopg.Connection) -> None:  # type: ignore[type-arg]
    target = parse_config(
        {
            "providers": {"p": {"kind": "hash", "dimensions": 3}},
            "targets": [
                {
                    "name": "t",
                    "table": '"we.ird"."Mixed Case"',
                    "id_column": "Id Col",
                    "text": "{Body Text}",
                    "embedding_column": 'E"mb',
                    "tenant_column": "Org",
                    "provider": "p",
                }
            ],
        }
    ).targets[0]
    q = TargetSQL(target, ColumnTypes("bigint", "vector"))
    sample = q.sample(unverified=True).as_string(conn)
    assert 'FROM "we.ird"."Mixed Case" AS s TABLESAMPLE SYSTEM (%(percent)s)' in sample
    assert '"s"."E""mb" IS NOT NULL AND NOT EXISTS' in sample
    assert 'p.row_key = "s"."Id Col"::text' in sample
    assert '"t"."Id Col" = ANY(ARRAY(SELECT "s"."Id Col"' in sample
    assert 'ORDER BY random() LIMIT %(limit)s)) ORDER BY "t"."Id Col"' in sample
    assert '"t"."Body Text"::text, "t"."E""mb"::real[] FROM' in sample
    assert "NULL::real[]" in q.sample(vectors=False).as_string(conn)
    page = q.with_vectors(first_page=False).as_string(conn)
    assert 'WHERE "t"."E""mb" IS NOT NULL AND "t"."Id Col" > %(after)s' in page
    adopt = q.adopt(first_page=True).as_string(conn)
    assert "ON CONFLICT (column_id, row_key) DO NOTHING" in adopt
    assert "DO UPDATE" not in adopt and "%(after)s" not in adopt
    assert 'md5(concat(coalesce("t"."Body Text"::text, \'\')))::uuid AS text_md5' in adopt
    assert 'ORDER BY "t"."Id Col" LIMIT %(limit)s' in adopt
