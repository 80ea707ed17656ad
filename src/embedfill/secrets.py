"""A value that never shows itself by accident."""

from __future__ import annotations

import hashlib
import re

# things that look like API keys: OpenAI's sk-..., bearer tokens, long random strings
_KEYLIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-*.]{6,}|Bearer\s+\S+|[A-Za-z0-9_\-]{32,})")


def scrub(text: str, *secrets: Secret | None) -> str:
    """Remove the given secrets, and anything shaped like a key, from a message that came
    from elsewhere (a provider's error body can echo the key it rejected)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret.reveal(), "***")
    return _KEYLIKE.sub("***", text)


class Secret:
    """Holds key material; ``str``/``repr`` print ``***``. Call ``reveal()`` at the point of use."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    @property
    def fingerprint(self) -> str:
        """A short, one-way id for grouping by key (rate limits, clients); never the key."""
        return hashlib.sha256(self._value.encode()).hexdigest()[:12]

    @property
    def masked(self) -> str:
        return "…" + self._value[-4:] if len(self._value) > 8 else "***"

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)
