from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ..config import ProviderConfig
from ..secrets import Secret
from ..tokens import TokenCounter
from .limits import RateSignals

Vector = npt.NDArray[np.float32]


class Embeddings(list[Vector]):
    """A provider's vectors, plus what its answer said of the key's rate limits.

    A plain list to everyone else, so the Provider protocol (``embed`` returns a list)
    and the local/hash providers stay as they are; a provider that hears limit headers
    returns this, and a ``ProviderError`` carries the same in ``signals``.
    """

    signals: RateSignals | None = None

    @classmethod
    def with_signals(cls, vectors: list[Vector], signals: RateSignals | None) -> Embeddings:
        out = cls(vectors)
        out.signals = signals
        return out


class Provider(Protocol):
    config: ProviderConfig
    needs_key: bool  # False for local/hash: no key, no bill

    @property
    def name(self) -> str: ...

    @property
    def max_batch(self) -> int: ...

    @property
    def max_input_tokens(self) -> int: ...

    def counter(self) -> TokenCounter: ...

    async def dimensions(self) -> int | None:
        """The vector size, when known without an embedding call."""
        ...

    async def embed(self, texts: Sequence[str], *, api_key: Secret | None) -> list[Vector]: ...

    async def aclose(self) -> None: ...


class ConfiguredProvider:
    """What every provider reads straight from its config."""

    needs_key = False

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.label

    @property
    def max_batch(self) -> int:
        return self.config.batch_size

    @property
    def max_input_tokens(self) -> int:
        return self.config.input_token_limit


def as_vectors(rows: Any) -> list[Vector]:
    """Turn a provider's output into float32 vectors (the engine checks their size
    against the column)."""
    return [np.asarray(r, dtype=np.float32) for r in rows]
