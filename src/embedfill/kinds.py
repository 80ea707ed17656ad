"""Provider kinds: what the configuration and the provider factory know of each, in one
table. A new kind of provider is its module under ``providers/`` (a class taking its
``ProviderConfig``) and one line in ``KINDS``; nothing else branches on a kind's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

DEFAULT_LOCAL_MODEL = "all-MiniLM-L6-v2"


class Model(NamedTuple):
    """What is known of a model without calling it."""

    dimensions: int
    max_input_tokens: int
    usd_per_1m_tokens: float


@dataclass(frozen=True)
class Kind:
    """One kind of provider (``kind = "…"`` in a provider section)."""

    name: str
    # "module:Class": a module of embedfill.providers, or a dotted path to one elsewhere;
    # imported when first used
    provider: str
    default_model: str | None = None  # None: the section must name one
    needs_dimensions: bool = False  # the section must say ``dimensions = N``
    concurrency: int | str = "auto"  # ``max_concurrency`` when the section sets none
    max_input_tokens: int = 8191  # a model of this kind that MODELS does not list
    needs_key: bool = False  # paid with an API key (a platform or a tenant's)
    priced: bool = False  # MODELS' prices apply (a local model costs nothing)
    knows_models: bool = True  # MODELS' sizes apply (a hash of any name is its own size)
    requires: str | None = None  # a package that comes with ``extra``, not the base install
    extra: str | None = None

    @property
    def missing_extra(self) -> str:
        """The sentence when ``requires`` is not installed."""
        return (
            f"kind = {self.name!r} needs the {self.extra} extra: "
            f"pip install 'embedfill[{self.extra}]'"
        )


# Models by name, whichever kind serves them (an OpenAI-compatible server may serve the
# local model): what is known of each without a call.
MODELS: Mapping[str, Model] = {
    "text-embedding-3-small": Model(1536, 8191, 0.02),
    "text-embedding-3-large": Model(3072, 8191, 0.13),
    "text-embedding-ada-002": Model(1536, 8191, 0.10),
    DEFAULT_LOCAL_MODEL: Model(384, 256, 0.0),
}

KINDS: Mapping[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("openai", "openai:OpenAIProvider", needs_key=True, priced=True),
        Kind(
            "local",
            "local:LocalProvider",
            default_model=DEFAULT_LOCAL_MODEL,
            concurrency=1,  # the model already uses every core
            max_input_tokens=512,
            requires="sentence_transformers",
            extra="local",
        ),
        Kind(
            "hash",
            "hashing:HashProvider",
            default_model="sha256",
            needs_dimensions=True,
            concurrency=4,
            knows_models=False,
        ),
    )
}
