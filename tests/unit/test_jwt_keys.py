"""Token keys carry ids and rotate without downtime: old and new tokens are accepted during
the overlap, a retired key's tokens are refused once the servers reload the keyring."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from producers.http.auth import (
    SECRET_FILE,
    TokenVerifier,
    Unauthenticated,
    keys_dir,
    load_keyring,
    receipt_secret,
    retire,
    rotate,
    token,
)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def bearer(t: str) -> str:
    return f"Bearer {t}"


def test_rotation_accepts_old_and_new_until_the_old_key_is_retired(tmp_path: Path):
    clock = Clock()
    ring = load_keyring(tmp_path)
    verifier = TokenVerifier(lambda: load_keyring(tmp_path), clock=clock)
    old = token("u1", "shopper", 3600, ring.signing, now=clock.now)
    assert jwt.get_unverified_header(old)["kid"] == "k1"
    assert verifier.verify(bearer(old)).user_id == "u1"

    d = keys_dir(tmp_path)
    assert rotate(d) == "k2"
    new = token("u2", "shopper", 3600, load_keyring(tmp_path).signing, now=clock.now)
    clock.now += 1.5  # the servers look at the keyring again at most once a second
    assert verifier.verify(bearer(new)).user_id == "u2"
    assert verifier.verify(bearer(old)).user_id == "u1"  # the overlap: both valid

    with pytest.raises(ValueError, match="rotate first"):
        retire(d, "k2")
    retire(d, "k1")
    assert verifier.verify(bearer(old)).user_id == "u1"  # cached until the next reload
    clock.now += 1.5
    assert verifier.verify(bearer(new)).user_id == "u2"  # this miss reloads: k1 is gone
    with pytest.raises(Unauthenticated, match="unknown or retired key"):
        verifier.verify(bearer(old))


def test_a_token_naming_an_unknown_key_or_forged_with_a_known_id_is_refused(tmp_path: Path):
    ring = load_keyring(tmp_path)
    verifier = TokenVerifier(lambda: load_keyring(tmp_path))
    from producers.http.auth import SigningKey

    with pytest.raises(Unauthenticated, match="unknown"):
        verifier.verify(bearer(token("u", "admin", 60, SigningKey("k9", "x" * 48))))
    with pytest.raises(Unauthenticated, match="invalid"):
        verifier.verify(bearer(token("u", "admin", 60, SigningKey(ring.current, "y" * 48))))


def test_the_pre_key_id_secret_becomes_the_first_key_and_keeps_receipts_valid(tmp_path: Path):
    (tmp_path / SECRET_FILE).write_text("legacy-" + "z" * 48 + "\n")
    ring = load_keyring(tmp_path)
    assert ring.keys == {"k1": "legacy-" + "z" * 48} and ring.current == "k1"
    # a token made before key ids (no kid) is checked against the current key
    verifier = TokenVerifier(lambda: load_keyring(tmp_path))
    assert verifier.verify(bearer(token("u", "shopper", 60, "legacy-" + "z" * 48))).role
    assert receipt_secret(tmp_path) == "legacy-" + "z" * 48
    legacy = bearer(token("u", "shopper", 600, "legacy-" + "z" * 48))
    rotate(keys_dir(tmp_path))
    assert receipt_secret(tmp_path) == "legacy-" + "z" * 48  # receipts outlive a rotation
    # a pre-key-id token stays valid after a rotation, until its key (k1) is retired
    assert TokenVerifier(lambda: load_keyring(tmp_path)).verify(legacy).user_id == "u"
    retire(keys_dir(tmp_path), "k1")
    with pytest.raises(Unauthenticated):
        TokenVerifier(lambda: load_keyring(tmp_path)).verify(legacy)
    assert {p.stat().st_mode & 0o777 for p in keys_dir(tmp_path).iterdir()} == {0o600}
