"""A zero-cost provider for tests and benchmarks: unit vectors derived from a hash of the
text. Deterministic, offline, and meaningless as semantics."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ..config import ProviderConfig
from ..secrets import Secret
from ..tokens import ApproxCounter, TokenCounter
from .base import Vector


def hash_vectors(texts: Sequence[str], dimensions: int) -> npt.NDArray[np.float32]:
    """Unit vectors that depend only on each text (SHAKE-128 output as int16 components),
    computed as one matrix."""
    raw = b"".join(
        hashlib.shake_128(t.encode("utf-8", "surrogatepass")).digest(2 * dimensions) for t in texts
    )
    m = np.frombuffer(raw, dtype="<i2").astype(np.float32).reshape(len(texts), dimensions)
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    out: npt.NDArray[np.float32] = m / norms
    return out


def hash_vector(text: str, dimensions: int) -> Vector:
    out: Vector = hash_vectors([text], dimensions)[0]
    return out


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
        return list(hash_vectors(texts, self._dims))

    async def aclose(self) -> None:
        return None
