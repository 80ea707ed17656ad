from __future__ import annotations

from embedfill.keys import decrypt, encrypt, new_master_key
from embedfill.secrets import Secret


def test_secret_never_prints_itself() -> None:
    s = Secret("sk-live-0123456789abcdef")
    assert "0123" not in repr(s) and "0123" not in str(s) and "0123" not in f"{s}"
    assert s.masked == "…cdef" and s.reveal() == "sk-live-0123456789abcdef"
    assert s.fingerprint != s.reveal() and len(s.fingerprint) == 12
    assert Secret("short").masked == "***"


def test_keys_round_trip_with_the_master_key() -> None:
    env = {"EMBEDFILL_MASTER_KEY": new_master_key()}
    token = encrypt("sk-tenant-secret", env)
    assert b"sk-tenant-secret" not in token
    assert decrypt(token, env).reveal() == "sk-tenant-secret"
