"""Pure planning: turn rows read from a table into provider requests.

Nothing here does I/O. The engine feeds rows in scan order and sends out what comes back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from .models import Batch, Row

V = TypeVar("V")

#: far more characters than a token of real text holds (3 to 5): a text is never
#: tokenized beyond ``max_tokens`` times this many characters (see prepare_text). Only
#: text made of long runs of one character could have fitted more whole.
CHARS_PER_TOKEN = 32


def prepare_text(
    text: str,
    *,
    count: Callable[[str], int],
    truncate: Callable[[str, int], str],
    max_tokens: int,
) -> tuple[str, int, bool] | None:
    """Return (text to send, its tokens, whether it was cut) or None for blank text.

    A text longer than ``CHARS_PER_TOKEN`` characters per token allowed is cut to that
    many characters before any tokenizer sees it: a tokenizer holds about fifty times
    the text it is given, and 10 MB of text would cost 500 MB for the 8,191 tokens
    that are sent of it."""
    if not text.strip():
        return None
    cap = max_tokens * CHARS_PER_TOKEN
    if len(text) > cap:
        # leading whitespace would fill the cap (5,000 spaces, then the words: the
        # provider got 1,600 spaces): the cut keeps the words
        text = text.lstrip()
    clipped = len(text) > cap
    if clipped:
        text = text[:cap]
    tokens = count(text)
    if tokens <= max_tokens:
        return text, tokens, clipped
    cut = truncate(text, max_tokens)
    return cut, min(count(cut), max_tokens), True


class TenantBatcher:
    """Groups rows into per-tenant batches of at most ``batch_size`` rows and
    ``max_tokens`` tokens.

    Rows arrive in id order with tenants interleaved. Full batches are released as soon
    as they fill; when more than ``max_buffered`` rows wait in partial batches (many
    small tenants), the largest partial batch is released early so memory stays flat.
    """

    def __init__(self, batch_size: int, max_tokens: int, max_buffered: int) -> None:
        if batch_size < 1 or max_tokens < 1 or max_buffered < 1:
            raise ValueError("batch_size, max_tokens and max_buffered must be positive")
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.max_buffered = max_buffered
        self._buffers: dict[str | None, list[Row]] = {}
        self._tokens: dict[str | None, int] = {}
        self._buffered = 0
        # tenants by the size of their partial batch (insertion-ordered sets), so the
        # largest is found in O(1): with 100,000 small tenants a scan of every buffer per
        # row made the dry run superlinear
        self._by_size: dict[int, dict[str | None, None]] = {}
        self._largest = 0

    @property
    def buffered(self) -> int:
        return self._buffered

    def add(self, row: Row) -> Sequence[Batch]:
        """The batches this row completes (most often none). Called once a row, so the
        bookkeeping of ``_resize`` is inline."""
        tenant, tokens = row.tenant, row.tokens
        buf = self._buffers.get(tenant)
        out: Sequence[Batch] = ()
        if buf is None:
            buf = self._buffers[tenant] = []
            self._tokens[tenant] = 0
        elif self._tokens[tenant] + tokens > self.max_tokens:
            out = [self._take(tenant)]
            buf = self._buffers[tenant] = []
            self._tokens[tenant] = 0
        by_size = self._by_size
        size = len(buf)
        if size:  # the tenant moves from the set of its size to the next
            bucket = by_size[size]
            del bucket[tenant]
            if not bucket:
                del by_size[size]
        size += 1
        grown = by_size.get(size)
        if grown is None:
            by_size[size] = {tenant: None}
        else:
            grown[tenant] = None
        if size > self._largest:
            self._largest = size
        buf.append(row)
        held = self._tokens[tenant] = self._tokens[tenant] + tokens
        self._buffered += 1
        if size >= self.batch_size or held >= self.max_tokens:
            out = [*out, self._take(tenant)]
        while self._buffered > self.max_buffered:
            out = [*out, self._take(self._largest_tenant())]
        return out

    def _resize(self, tenant: str | None, was: int, now: int) -> None:
        if was:
            bucket = self._by_size[was]
            del bucket[tenant]
            if not bucket:
                del self._by_size[was]
        if now:
            self._by_size.setdefault(now, {})[tenant] = None
            self._largest = max(self._largest, now)

    def _largest_tenant(self) -> str | None:
        while self._largest not in self._by_size:
            self._largest -= 1
        return next(iter(self._by_size[self._largest]))

    def flush(self) -> list[Batch]:
        return [self._take(t) for t in list(self._buffers)]

    def flush_where(self, holds: Callable[[Row], bool]) -> list[Batch]:
        """Release the partial batches holding a row for which ``holds`` is true."""
        return [self._take(t) for t, rows in list(self._buffers.items()) if any(map(holds, rows))]

    def _take(self, tenant: str | None) -> Batch:
        rows = self._buffers.pop(tenant)
        self._resize(tenant, len(rows), 0)
        self._tokens.pop(tenant, None)
        self._buffered -= len(rows)
        return Batch(tenant=tenant, rows=tuple(rows))


def split_batch(batch: Batch) -> tuple[Batch, Batch]:
    """Halve a batch, to find the one input a provider rejects."""
    mid = len(batch.rows) // 2
    return Batch(batch.tenant, batch.rows[:mid]), Batch(batch.tenant, batch.rows[mid:])


class BoundedCache(Generic[V]):
    """A mapping that forgets its oldest entries beyond ``capacity`` (first in, first
    out: cheaper than LRU bookkeeping, and as good for spotting repeated texts)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        # OrderedDict: popping a plain dict's oldest key rescans its deleted slots
        self._data: OrderedDict[Any, V] = OrderedDict()

    def get(self, key: Any) -> V | None:
        return self._data.get(key)

    def put(self, key: Any, value: V) -> None:
        if self.capacity == 0:
            return
        self._data[key] = value
        if len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def estimate_cost(tokens: int, price_per_1m: float) -> float:
    return tokens * price_per_1m / 1_000_000
