"""Embedding providers: each declares its limits and embeds one batch, nothing else.

Batching, retries, rate limits and concurrency live in planning.py, retry.py,
ratelimit.py and engine/embed.py. Which class serves a ``kind``, and what the config
knows of it, is one line of ``kinds.KINDS``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import cast

from ..config import ProviderConfig
from ..errors import ConfigError
from ..kinds import KINDS
from .base import Matrix, Provider, Vector


def check_available(config: ProviderConfig) -> None:
    """Raise a one-sentence ConfigError when this provider's packages are not installed
    (cheap: finds, does not import)."""
    kind = KINDS[config.kind]
    if kind.requires is None:
        return
    try:
        found = importlib.util.find_spec(kind.requires) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        found = False
    if not found:
        raise ConfigError(kind.missing_extra)


def needs_key(config: ProviderConfig) -> bool:
    """Whether this kind of provider is paid with an API key (local and hash are not)."""
    return KINDS[config.kind].needs_key


def make_provider(config: ProviderConfig) -> Provider:
    """Create the provider for a config. Clients and models load lazily, once."""
    check_available(config)
    module, name = KINDS[config.kind].provider.split(":")
    path = module if "." in module else f"{__name__}.{module}"
    cls = getattr(importlib.import_module(path), name)
    return cast(Provider, cls(config))


__all__ = ["Matrix", "Provider", "Vector", "check_available", "make_provider", "needs_key"]
