"""Pure planning: turn rows read from a table into provider requests.

Nothing here does I/O. The engine feeds rows in scan order and sends out what comes back.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from .models import Batch, Row

V = TypeVar("V")


def prepare_text(
    text: str,
    *,
    count: Callable[[str], int],
    truncate: Callable[[str, int], str],
    max_tokens: int,
) -> tuple[str, int, bool] | None:
    """Return (text to send, its tokens, whether it was cut) or None for blank text."""
    if not text.strip():
        return None
    tokens = count(text)
    if tokens <= max_tokens:
        return text, tokens, False
    cut = truncate(text, max_tokens)
    return cut, min(count(cut), max_tokens), True


def text_key(tenant: str | None, text: str) -> bytes:
    """Identity of a text within one run and tenant (dedup never crosses tenants): a
    128-bit digest, so memory per remembered text stays small."""
    scope = "\x00" if tenant is None else f"\x01{len(tenant)}:{tenant}"
    data = f"{scope}\x00{text}".encode("utf-8", "surrogatepass")
    return hashlib.md5(data, usedforsecurity=False).digest()


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

    @property
    def buffered(self) -> int:
        return self._buffered

    def add(self, row: Row) -> list[Batch]:
        out: list[Batch] = []
        buf = self._buffers.setdefault(row.tenant, [])
        if buf and self._tokens[row.tenant] + row.tokens > self.max_tokens:
            out.append(self._take(row.tenant))
            buf = self._buffers.setdefault(row.tenant, [])
        buf.append(row)
        self._tokens[row.tenant] = self._tokens.get(row.tenant, 0) + row.tokens
        self._buffered += 1
        if len(buf) >= self.batch_size or self._tokens[row.tenant] >= self.max_tokens:
            out.append(self._take(row.tenant))
        while self._buffered > self.max_buffered:
            largest = max(self._buffers, key=lambda t: len(self._buffers[t]))
            out.append(self._take(largest))
        return out

    def flush(self) -> list[Batch]:
        return [self._take(t) for t in list(self._buffers)]

    def _take(self, tenant: str | None) -> Batch:
        rows = self._buffers.pop(tenant)
        self._tokens.pop(tenant, None)
        self._buffered -= len(rows)
        return Batch(tenant=tenant, rows=tuple(rows))


def split_batch(batch: Batch) -> tuple[Batch, Batch]:
    """Halve a batch, to find the one input a provider rejects."""
    mid = len(batch.rows) // 2
    return Batch(batch.tenant, batch.rows[:mid]), Batch(batch.tenant, batch.rows[mid:])


class LRU(Generic[V]):
    """A small bounded mapping; the oldest entry goes first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self._data: OrderedDict[bytes, V] = OrderedDict()

    def get(self, key: bytes) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: bytes, value: V) -> None:
        if self.capacity == 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def estimate_cost(tokens: int, price_per_1m: float) -> float:
    return tokens * price_per_1m / 1_000_000


def chunked(items: Iterable[V], size: int) -> Iterable[list[V]]:
    chunk: list[V] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
