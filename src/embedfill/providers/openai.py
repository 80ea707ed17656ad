"""Any OpenAI-compatible ``/v1/embeddings`` endpoint, through the official SDK.

The SDK's own retries are off (``max_retries=0``): retry.py decides, so that waits,
Retry-After and give-ups are counted and reported in one place. Vectors are asked for
as base64 and decoded with numpy, which is ~10x faster than JSON floats at 1536-d;
answers.py checks every answer before a vector of it is used. ``timeout_s`` is a
deadline for the whole request, body included.

The request goes through the SDK's documented raw ``client.post(path, cast_to=Response,
body=...)`` (auth, base_url, timeouts and error classes stay the SDK's), skipping its
per-request transformation of the input list and pydantic parsing of the response:
together ~8 ms of CPU per 50-input request, which capped a client at ~40 requests/s.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Mapping, Sequence
from typing import Any

import openai

try:  # the HTTP library the SDK sends with (httpx2 from openai 3, httpx before)
    import httpx2 as _http
except ImportError:  # pragma: no cover
    import httpx as _http  # type: ignore[no-redef]

from ..config import ProviderConfig
from ..errors import (
    AuthFailed,
    BadInput,
    NoApiKey,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)
from ..secrets import Secret, scrub
from ..tokens import TokenCounter, openai_counter
from .answers import decode_embeddings
from .base import ConfiguredProvider, Embeddings, Vector
from .limits import RateSignals


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, OverflowError, OSError):  # not a date any clock can hold
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping) and isinstance(err.get("message"), str):
            return str(err["message"])[:300]
    return f"HTTP {exc.status_code}"


def translate(exc: Exception) -> ProviderError:
    """Map SDK exceptions to embedfill's provider errors (which say nothing of the key)."""
    if isinstance(exc, openai.APITimeoutError):
        return ProviderUnavailable("The embedding request timed out.")
    if isinstance(exc, openai.APIConnectionError):
        return ProviderUnavailable("The connection to the embedding API failed.")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retry_after = parse_retry_after(exc.response.headers if exc.response else None)
        msg = _message(exc)
        if status == 429:
            return RateLimited(
                f"Rate limited by the provider (429): {msg}", status=status, retry_after=retry_after
            )
        if status in (401, 403):
            return AuthFailed(f"The provider rejected the API key ({status}): {msg}", status=status)
        if status in (400, 413, 422):
            return BadInput(f"The provider rejected the input ({status}): {msg}", status=status)
        if status >= 500 or status in (408, 409):
            return ProviderUnavailable(
                f"The provider failed ({status}): {msg}", status=status, retry_after=retry_after
            )
        return ProviderError(f"The provider answered {status}: {msg}", status=status)
    return ProviderUnavailable(f"The embedding request failed: {type(exc).__name__}.")


class OpenAIProvider(ConfiguredProvider):
    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self._clients: dict[str, openai.AsyncOpenAI] = {}

    def counter(self) -> TokenCounter:
        return openai_counter()

    async def dimensions(self) -> int | None:
        return self.config.expected_dimensions

    def _client(self, key: Secret) -> openai.AsyncOpenAI:
        client = self._clients.get(key.fingerprint)
        if client is None:
            client = openai.AsyncOpenAI(
                api_key=key.reveal(),
                base_url=self.config.base_url,  # None: OPENAI_BASE_URL, else OpenAI
                max_retries=0,
                timeout=self.config.timeout_s,
            )
            self._clients[key.fingerprint] = client
        return client

    async def embed(self, texts: Sequence[str], *, api_key: Secret | None) -> list[Vector]:
        if not api_key:
            raise NoApiKey()
        if not api_key.reveal().isascii():  # no HTTP header carries it: say so, never hang
            raise AuthFailed(
                "The API key holds a character an HTTP header cannot carry (a byte-order "
                "mark, a typographic quote): store it again as plain ASCII.",
                status=401,
            )
        body: dict[str, Any] = {
            "input": list(texts),
            "model": self.config.model,
            "encoding_format": "base64",
        }
        if self.config.dimensions is not None:
            body["dimensions"] = self.config.dimensions
        try:
            # the client's timeout bounds each read; this bounds the whole request, so
            # a body trickled a few bytes at a time cannot hold a worker for ever
            async with asyncio.timeout(self.config.timeout_s):
                resp = await self._client(api_key).post(
                    "/embeddings", cast_to=_http.Response, body=body
                )
        except TimeoutError:
            raise ProviderUnavailable(
                f"The embedding request took longer than timeout_s = {self.config.timeout_s:g} s."
            ) from None
        except openai.OpenAIError as exc:
            error = translate(exc)
            error.args = (scrub(str(error), api_key),)
            if isinstance(exc, openai.APIStatusError):
                error.signals = RateSignals.from_headers(exc.response.headers)
            raise error from None
        signals = RateSignals.from_headers(resp.headers)
        try:
            vectors = decode_embeddings(resp.content, len(texts))
        except ProviderError as error:  # a malformed answer still counted against the key
            error.signals = signals
            raise
        return Embeddings.with_signals(vectors, signals)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
