"""A zero-cost provider for tests and benchmarks: unit vectors derived from a hash of the
text. Deterministic, offline, and meaningless as semantics."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from ..config import ProviderConfig
from ..secrets import Secret
from ..tokens import ApproxCounter, TokenCounter
from .base import Vector


def hash_vector(text: str, dimensions: int) -> Vector:
    """A unit vector that depends only on the text (SHAKE-128 output as int16 components)."""
    raw = hashlib.shake_128(text.encode("utf-8", "surrogatepass")).digest(2 * dimensions)
    v = np.frombuffer(raw, dtype="<i2").astype(np.float32)
    norm = float(np.linalg.norm(v))
    return v / norm if norm else np.full(dimensions, dimensions**-0.5, dtype=np.float32)


class HashProvider:
    needs_key = False

    def __init__(self, config: ProviderConfig) -> None:
        assert config.dimensions is not None
        self.config = config
        self._dims = config.dimensions
        self.calls = 0

    @property
    def name(self) -> str:
        return self.config.label

    @property
    def max_batch(self) -> int:
        return self.config.batch_size

    @property
    def max_input_tokens(self) -> int:
        return self.config.input_token_limit

    def counter(self) -> TokenCounter:
        return ApproxCounter()  # zero-cost provider, zero-cost counting

    async def dimensions(self) -> int | None:
        return self._dims

    async def embed(self, texts: Sequence[str], *, api_key: Secret | None) -> list[Vector]:
        self.calls += 1
        return [hash_vector(t, self._dims) for t in texts]

    async def aclose(self) -> None:
        return None
