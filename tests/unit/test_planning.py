from __future__ import annotations

import pytest

from embedfill.models import Row
from embedfill.planning import BoundedCache, TenantBatcher, prepare_text, split_batch
from embedfill.ratelimit import UNLIMITED, Rates, budget_key, wait_for
from embedfill.secrets import Secret


def row(i: int, tenant: str | None, tokens: int = 1) -> Row:
    return Row(id=i, tenant=tenant, text=f"t{i}", key=b"", tokens=tokens)


def test_batches_never_mix_tenants_and_respect_size() -> None:
    b = TenantBatcher(batch_size=3, max_tokens=1000, max_buffered=100)
    out = []
    for i in range(20):
        out += b.add(row(i, "ab"[i % 2]))
    out += b.flush()
    assert all(len({r.tenant for r in batch.rows}) == 1 for batch in out)
    assert all(len(batch.rows) <= 3 for batch in out)
    assert sorted(r.id for batch in out for r in batch.rows) == list(range(20))
    # full batches are released as soon as they fill: a tenant's rows keep scan order
    assert [r.id for r in out[0].rows] == [0, 2, 4]


def test_batches_are_cut_by_tokens() -> None:
    b = TenantBatcher(batch_size=100, max_tokens=10, max_buffered=100)
    out = []
    for i in range(5):
        out += b.add(row(i, "a", tokens=4))
    out += b.flush()
    assert [len(x.rows) for x in out] == [2, 2, 1]
    assert all(x.tokens <= 10 for x in out)


def test_many_small_tenants_keep_the_buffer_bounded() -> None:
    b = TenantBatcher(batch_size=50, max_tokens=10**6, max_buffered=10)
    for i in range(1000):
        b.add(row(i, f"tenant-{i % 400}"))
        assert b.buffered <= 10


def test_split_halves_a_batch() -> None:
    from embedfill.models import Batch

    left, right = split_batch(Batch("a", tuple(row(i, "a") for i in range(5))))
    assert [r.id for r in left.rows] == [0, 1] and [r.id for r in right.rows] == [2, 3, 4]


def test_prepare_text() -> None:
    def count(s: str) -> int:
        return len(s.split())

    def truncate(s: str, n: int) -> str:
        return " ".join(s.split()[:n])

    assert prepare_text("  \n ", count=count, truncate=truncate, max_tokens=3) is None
    assert prepare_text("a b", count=count, truncate=truncate, max_tokens=3) == ("a b", 2, False)
    assert prepare_text("a b c d e", count=count, truncate=truncate, max_tokens=3) == (
        "a b c",
        3,
        True,
    )
    # whitespace ahead of the words filled the cap, and only spaces were sent
    spaced = " " * 5000 + "real words here"
    assert prepare_text(spaced, count=count, truncate=truncate, max_tokens=50) == (
        "real words here",
        3,
        False,
    )
    long_spaced = " " * 5000 + "word " * 1000
    cut = prepare_text(long_spaced, count=count, truncate=truncate, max_tokens=50)
    assert cut is not None and cut[0].startswith("word") and cut[1:] == (50, True)


def test_bounded_cache_forgets_the_oldest() -> None:
    cache: BoundedCache[int] = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert cache.get("a") is None and cache.get("b") == 2 and len(cache) == 2
    nothing: BoundedCache[int] = BoundedCache(0)
    nothing.put("a", 1)
    assert nothing.get("a") is None


def test_rates_cost_and_capacity() -> None:
    rates = Rates(rpm=60, tpm=600, burst_s=5.0)  # 1 request/s, 10 tokens/s
    terms = rates.terms(30)
    assert terms["requests"] == 1.0 and terms["req_rate"] == 1.0 and terms["req_cap"] == 5.0
    assert terms["tokens"] == 30.0 and terms["tok_rate"] == 10.0 and terms["tok_cap"] == 50.0
    # a request larger than the burst still fits a full bucket (then waits its turn)
    assert Rates(rpm=0, tpm=60).terms(500)["tok_cap"] == 500.0
    unlimited = Rates(rpm=0, tpm=0).terms(10**9)
    assert unlimited["requests"] == unlimited["tokens"] == 0.0
    assert unlimited["req_cap"] == unlimited["tok_cap"] == UNLIMITED
    assert not Rates(0, 0).limited and Rates(0, 1).limited


def test_wait_is_the_stricter_deficit_or_the_pause() -> None:
    rates = Rates(rpm=600, tpm=60)  # 10 requests/s, 1 token/s
    assert wait_for(rates, req_level=0.0, tok_level=5.0, paused_s=0.0) == 0.0
    assert wait_for(rates, req_level=-1.0, tok_level=5.0, paused_s=0.0) == pytest.approx(0.1)
    assert wait_for(rates, req_level=-1.0, tok_level=-30.0, paused_s=0.0) == pytest.approx(30.0)
    assert wait_for(rates, req_level=1.0, tok_level=1.0, paused_s=4.0) == 4.0
    assert wait_for(Rates(0, 0), req_level=-9.0, tok_level=-9.0, paused_s=0.0) == 0.0


def test_budget_key_is_one_way_and_scoped() -> None:
    a = budget_key("openai||m", Secret("sk-secret-aaaaaaaa"))
    assert "sk-secret" not in a and len(a) == 32
    assert a == budget_key("openai||m", Secret("sk-secret-aaaaaaaa"))
    assert a != budget_key("openai||other-model", Secret("sk-secret-aaaaaaaa"))
    assert a != budget_key("openai||m", Secret("sk-secret-bbbbbbbb"))


def test_a_huge_text_is_cut_before_the_tokenizer_sees_it() -> None:
    """A 10 MB text in one row: the tokenizer is handed at most max_tokens x 32
    characters of it (it held ~50x the whole text before), with the real tokenizer."""
    import tracemalloc

    from embedfill.planning import CHARS_PER_TOKEN
    from embedfill.tokens import openai_counter

    counter = openai_counter()
    seen: list[int] = []

    def count(text: str) -> int:
        seen.append(len(text))
        return counter.count(text)

    def truncate(text: str, max_tokens: int) -> str:
        seen.append(len(text))
        return counter.truncate(text, max_tokens)

    huge = "lorem ipsum dolor sit amet " * 400_000  # 10.8 MB
    tracemalloc.start()
    prepared = prepare_text(huge, count=count, truncate=truncate, max_tokens=8191)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert prepared is not None
    text, tokens, cut = prepared
    assert cut and tokens == 8191 and huge.startswith(text)
    assert max(seen) <= 8191 * CHARS_PER_TOKEN
    assert peak < 60 * 1024 * 1024, peak  # the whole text through the tokenizer: ~500 MB
