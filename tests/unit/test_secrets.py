from __future__ import annotations

from embedfill.keys import decrypt, encrypt, new_master_key
from embedfill.secrets import Secret, scrub


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


def test_scrub_removes_the_key_and_key_shaped_strings() -> None:
    key = Secret("sk-proj-abcdefghijklmnop0123")
    message = (
        "Incorrect API key provided: sk-proj-abcdefghijklmnop0123. Also "
        "sk-proj-****************0123 and Bearer xyz123 and "
        "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7 but not ordinary words."
    )
    cleaned = scrub(message, key)
    assert "abcdefghijklmnop" not in cleaned and "0123" not in cleaned
    assert "xyz123" not in cleaned and "a1B2c3" not in cleaned
    assert cleaned.endswith("but not ordinary words.")
