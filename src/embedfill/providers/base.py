from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..config import ProviderConfig
from ..kinds import KINDS
from ..secrets import Secret
from ..tokens import TokenCounter
from .limits import RateSignals

Vector = npt.NDArray[np.float32]
#: A provider's answer: a list of vectors, or one 2-D array with a row per input (the
#: local and hash providers compute one: it is checked and written whole, never cut
#: into a list of rows and stacked again).
Vectors = Sequence[Vector] | npt.NDArray[np.float32]
Matrix = npt.NDArray[np.float32]  # vectors of one size, one per row


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

    async def embed(self, texts: Sequence[str], *, api_key: Secret | None) -> Vectors: ...

    async def aclose(self) -> None: ...


class ConfiguredProvider:
    """What every provider reads straight from its config."""

    needs_key: bool

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.needs_key = KINDS[config.kind].needs_key

    @property
    def name(self) -> str:
        return self.config.label

    @property
    def max_batch(self) -> int:
        return self.config.batch_size

    @property
    def max_input_tokens(self) -> int:
        return self.config.input_token_limit

    async def aclose(self) -> None:
        """Release clients or models (nothing, unless the provider holds some)."""
