"""Embedding providers: each declares its limits and embeds one batch, nothing else.

Batching, retries, rate limits and concurrency live in planning.py, retry.py,
ratelimit.py and engine.py.
"""

from __future__ import annotations

from ..config import ProviderConfig
from .base import Provider, Vector


def make_provider(config: ProviderConfig) -> Provider:
    """Create the provider for a config. Clients and models load lazily, once."""
    if config.kind == "openai":
        from .openai import OpenAIProvider

        return OpenAIProvider(config)
    if config.kind == "local":
        from .local import LocalProvider

        return LocalProvider(config)
    from .hashing import HashProvider

    return HashProvider(config)


__all__ = ["Provider", "Vector", "make_provider"]
