"""Bring your own key: which API key pays for a tenant's rows.

Order: the encrypted key store (``embedfill keys set``), then the target's
``tenant_key_sql``, then the provider's platform key (when the target allows it).
Keys are resolved at the moment of use into ``Secret`` values; only tenant ids and key
sources are ever logged or reported.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from cryptography.fernet import Fernet, InvalidToken

from .config import ProviderConfig, TargetConfig, env_secret
from .db.connect import user_context
from .db.store import Store
from .errors import KeyStoreError, UsageError
from .models import KeySource
from .secrets import Secret

MASTER_KEY_ENV = "EMBEDFILL_MASTER_KEY"


def new_master_key() -> str:
    return Fernet.generate_key().decode()


def _fernet(env: Mapping[str, str]) -> Fernet:
    raw = env_secret(env, MASTER_KEY_ENV)  # or EMBEDFILL_MASTER_KEY_FILE
    if not raw:
        raise KeyStoreError(
            f"{MASTER_KEY_ENV} is not set; create one with `embedfill keys new-master-key` "
            "and export it (keep it in your secret manager)."
        )
    try:
        return Fernet(raw.encode())
    except (ValueError, TypeError):
        raise KeyStoreError(
            f"{MASTER_KEY_ENV} is not a valid key; create one with `embedfill keys new-master-key`."
        ) from None


def encrypt(key: str, env: Mapping[str, str]) -> bytes:
    return _fernet(env).encrypt(key.encode())


def decrypt(token: bytes, env: Mapping[str, str]) -> Secret:
    try:
        return Secret(_fernet(env).decrypt(token).decode())
    except InvalidToken:
        raise KeyStoreError(
            f"A stored key cannot be decrypted with this {MASTER_KEY_ENV}; use the master "
            "key the keys were stored with, or store the tenant's key again."
        ) from None


MAX_TENANT_CHARS = 512  # a stored key's tenant id (the key store's primary key)


def check_tenant_id(tenant: str) -> str:
    """The tenant id as given, or a UsageError in one sentence: empty, blank, over
    ``MAX_TENANT_CHARS`` or holding a NUL byte (PostgreSQL stores none) never matches a
    tenant column, and would only store a key nobody uses."""
    if not tenant.strip():
        raise UsageError(
            "The tenant id is empty; pass the tenant's id as its rows hold it in the tenant "
            "column, e.g. --tenant acme."
        )
    if len(tenant) > MAX_TENANT_CHARS:
        raise UsageError(
            f"The tenant id is {len(tenant):,} characters long, over the "
            f"{MAX_TENANT_CHARS} a stored key allows; pass the id as the tenant column holds it."
        )
    if "\x00" in tenant:
        raise UsageError("The tenant id holds a NUL character, which PostgreSQL cannot store.")
    return tenant


def key_hint(key: str) -> str:
    return Secret(key).masked


@dataclass(frozen=True)
class ResolvedKey:
    key: Secret | None
    source: KeySource
    error: str | None = None  # why the tenant cannot be embedded
    fallback: bool = False  # the platform key, for a tenant whose own was looked for

    @property
    def digest(self) -> str:
        """Which key this is, to tell a changed key from the one a failure was met with
        (recorded with failures): 16 hex digits of a SHA-256 of the key under embedfill's
        own prefix, never the key or a part of it; "none" without a key."""
        if self.key is None:
            return "none"
        seen = hashlib.sha256(b"embedfill-key-digest\0" + self.key.reveal().encode())
        return seen.hexdigest()[:16]


# a tenant's key is looked up again after this long: a key stored (`keys set`) or
# changed where tenant_key_sql reads it reaches a long-lived session (a watch's)
KEY_TTL_S = 5.0


class KeyResolver:
    """Resolves and caches one key per tenant for one run, for ``KEY_TTL_S``."""

    def __init__(
        self,
        store: Store | None,
        conn: psycopg.AsyncConnection[Any],
        target: TargetConfig,
        provider: ProviderConfig,
        needs_key: bool,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.conn = conn
        self.target = target
        self.provider = provider
        self.needs_key = needs_key
        self.env = os.environ if env is None else env
        self._cache: dict[str | None, tuple[float, ResolvedKey]] = {}

    def platform_key(self) -> Secret | None:
        value = env_secret(self.env, self.provider.api_key_env)  # or its _FILE
        return Secret(value) if value else None

    def cached(self, tenant: str | None) -> ResolvedKey | None:
        """The tenant's key if it was resolved in the last ``KEY_TTL_S`` (no database
        needed)."""
        found = self._cache.get(tenant)
        if found is None or time.monotonic() - found[0] > KEY_TTL_S:
            return None
        return found[1]

    def last(self, tenant: str | None) -> ResolvedKey | None:
        """The tenant's key as last resolved, however long ago (what a request that just
        failed was sent with, even past ``KEY_TTL_S``)."""
        found = self._cache.get(tenant)
        return None if found is None else found[1]

    async def resolve(self, tenant: str | None) -> ResolvedKey:
        found = self.cached(tenant)
        if found is None:
            found = await self._resolve(tenant)
            self._cache[tenant] = (time.monotonic(), found)
        return found

    async def _resolve(self, tenant: str | None) -> ResolvedKey:
        """An empty (or blank) key from any source is no key: the next source is tried,
        and the reason, when there is none at all, says which source was empty."""
        if not self.needs_key:
            return ResolvedKey(None, "none")
        notes: list[str] = []
        if tenant is not None:
            if self.store is not None:
                token = await self.store.get_key(tenant)
                if token is not None:
                    try:
                        stored = decrypt(token, self.env)
                    except KeyStoreError as exc:
                        return ResolvedKey(None, "none", str(exc))
                    if stored.reveal().strip():
                        return ResolvedKey(Secret(stored.reveal().strip()), "tenant")
                    notes.append("its stored key is empty")
            if self.target.tenant_key_sql:
                try:
                    # the user's own query: their tables and functions, as the app names
                    # them (the connection's own search_path, not embedfill's pinned one)
                    async with user_context(self.conn):
                        cur = await self.conn.execute(
                            self.target.tenant_key_sql.encode(), {"tenant": tenant}
                        )
                        rows = await cur.fetchmany(2)
                except psycopg.Error as exc:
                    return ResolvedKey(
                        None,
                        "none",
                        f"tenant_key_sql failed ({type(exc).__name__}); check the query "
                        "in the target's config.",
                    )
                if len(rows) > 1:  # which key would be a guess: this tenant fails, says why
                    return ResolvedKey(
                        None,
                        "none",
                        f"tenant_key_sql returned several rows for tenant {tenant!r}; make it "
                        "return one row (a unique key in its WHERE clause).",
                    )
                row = rows[0] if rows else None
                value = "" if not row or row[0] is None else str(row[0]).strip()
                if value:
                    return ResolvedKey(Secret(value), "tenant")
                notes.append(
                    "tenant_key_sql gave an empty key"
                    if row and row[0] is not None
                    else "tenant_key_sql gave no key"
                )
        platform = self.platform_key()
        if platform is not None and (tenant is None or self.target.allow_platform_fallback):
            # a tenant's own key was looked for (tenant_key_sql, or a stored one that is
            # empty) and not found: the platform pays, which its owner may not have meant
            looked = tenant is not None and bool(self.target.tenant_key_sql or notes)
            return ResolvedKey(platform, "platform", fallback=looked)
        detail = f" ({'; '.join(notes)})" if notes else ""
        if tenant is not None and not self.target.allow_platform_fallback:
            why = (
                f"tenant {tenant!r} has no API key of its own{detail} and this target does "
                "not fall back to the platform key; store one with `embedfill keys set`."
            )
        else:
            env_name = self.provider.api_key_env
            state = "is empty" if env_name in self.env else "is not set"
            why = (
                f"no API key: {env_name} {state} and no tenant key was found{detail}; "
                "set the variable or store a key with `embedfill keys set`."
            )
        return ResolvedKey(None, "none", why)
