"""A value that never shows itself by accident."""

from __future__ import annotations

import hashlib


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
