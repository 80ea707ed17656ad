"""A zero-cost provider for tests and benchmarks: unit vectors derived from a hash of the
text. Deterministic, offline, and meaningless as semantics."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from ..config import ProviderConfig
from ..secrets import Secret
from ..tokens import ApproxCounter, TokenCounter
from .base import ConfiguredProvider, Vector, Vectors


@lru_cache(maxsize=8)
def _basis(dimensions: int) -> npt.NDArray[np.float32]:
    """Two fixed sets of 1024 random vectors; a text's vector mixes one of each."""
    rng = np.random.default_rng(20261126)
    return rng.standard_normal((2, 1024, dimensions)).astype(np.float32)


def hash_vectors(texts: Sequence[str], dimensions: int) -> npt.NDArray[np.float32]:
    """Unit vectors that depend only on each text: the CRC-32 of the text picks one
    vector from each of two fixed random sets (a million combinations), summed and
    normalised. Cheap (well under a microsecond a text), so benchmarks measure embedfill,
    not this provider."""
    crcs = np.fromiter(
        (zlib.crc32(t.encode("utf-8", "surrogatepass")) for t in texts),
        dtype=np.uint32,
        count=len(texts),
    )
    basis = _basis(dimensions)
    m: npt.NDArray[np.float32] = basis[0].take(crcs & 1023, axis=0)
    m += basis[1].take((crcs >> 10) & 1023, axis=0)
    norms = np.sqrt(np.einsum("ij,ij->i", m, m))[:, None]
    norms[norms == 0] = 1.0
    m /= norms
    return m


def hash_vector(text: str, dimensions: int) -> Vector:
    out: Vector = hash_vectors([text], dimensions)[0]
    return out


class HashProvider(ConfiguredProvider):
    def __init__(self, config: ProviderConfig) -> None:
        assert config.dimensions is not None
        super().__init__(config)
        self._dims = config.dimensions

    def counter(self) -> TokenCounter:
        return ApproxCounter()  # zero-cost provider, zero-cost counting

    async def dimensions(self) -> int | None:
        return self._dims

    async def embed(self, texts: Sequence[str], *, api_key: Secret | None) -> Vectors:
        return hash_vectors(texts, self._dims)
