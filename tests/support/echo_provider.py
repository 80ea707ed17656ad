"""A provider kind that is not embedfill's: what adding a kind takes (tests/unit/test_kinds.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embedfill.providers.base import ConfiguredProvider, Vectors
from embedfill.secrets import Secret
from embedfill.tokens import ApproxCounter, TokenCounter


class EchoProvider(ConfiguredProvider):
    """Each text's vector is its length, then zeros."""

    def counter(self) -> TokenCounter:
        return ApproxCounter()

    async def dimensions(self) -> int | None:
        return self.config.dimensions

    async def embed(self, texts: Sequence[str], *, api_key: Secret | None) -> Vectors:
        size = self.config.dimensions or 4
        out = []
        for text in texts:
            vector = np.zeros(size, dtype=np.float32)
            vector[0] = len(text)
            out.append(vector)
        return out
