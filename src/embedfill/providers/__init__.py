"""Embedding providers: each declares its limits and embeds one batch, nothing else.

Batching, retries, rate limits and concurrency live in planning.py, retry.py,
ratelimit.py and engine/embed.py.
"""

from __future__ import annotations

from ..config import ProviderConfig
from .base import Matrix, Provider, Vector


def check_available(config: ProviderConfig) -> None:
    """Raise a one-sentence ConfigError when this provider's packages are not installed."""
    if config.kind == "local":
        from .local import require_local_extra

        require_local_extra()


def needs_key(config: ProviderConfig) -> bool:
    """Whether this kind of provider is paid with an API key (local and hash are not)."""
    return config.kind == "openai"


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


__all__ = ["Matrix", "Provider", "Vector", "check_available", "make_provider", "needs_key"]
