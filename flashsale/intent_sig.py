"""The edge's signature on purchase intents: an HMAC-SHA256 of the record's value in a header.

Several principals may write the command topic (the sale clock, the payment service, the
operator), and a topic ACL cannot restrict record types; so the writer accepts an intent only
with a valid signature from a holder of the intent key (the edge; and the operator's own
commands) and dead-letters an unsigned (``unsigned-intent``) or forged one
(``forged-intent``). The key is a file named by ``FLASHSALE_INTENT_KEY_FILE``, handed only to
those processes; without it nothing is signed or checked (the one-node stack).
"""

from __future__ import annotations

import functools
import hmac
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashsale.settings import SettingError, Settings

# as confluent-kafka and aiokafka give and take them
Headers = list[tuple[str, str | bytes | None]]
ENV_KEY_FILE = "FLASHSALE_INTENT_KEY_FILE"
HEADER = "fs-sig"


@functools.cache
def key() -> bytes | None:
    """This process's intent key, or None when it has none."""
    path = os.environ.get(ENV_KEY_FILE)
    if not path:
        return None
    try:
        raw = Path(path).read_bytes().strip()
    except OSError as exc:
        raise SettingError(f"{ENV_KEY_FILE}={path} cannot be read: {exc.strerror}") from None
    if len(raw) < 32:
        raise SettingError(f"{ENV_KEY_FILE}={path} holds {len(raw)} bytes; a key needs 32")
    return raw


def sign(value: bytes, secret: bytes) -> bytes:
    return hmac.digest(secret, value, "sha256")


def headers(value: bytes) -> Headers | None:
    """The headers that sign ``value`` with this process's key (None without a key)."""
    secret = key()
    return None if secret is None else headers_for(value, secret)


def headers_for(value: bytes, secret: bytes) -> Headers:
    return [(HEADER, sign(value, secret))]


def problem(value: bytes, record_headers: Sequence[tuple[str, Any]] | None,
            secret: bytes) -> tuple[str, str] | None:  # fmt: skip
    """None when ``value`` carries a valid signature, else (reason, detail)."""
    found = [v for k, v in record_headers or () if k == HEADER]
    if not found:
        return "unsigned-intent", f"a PurchaseIntent without the edge's {HEADER} header"
    sig = found[0] if len(found) == 1 and isinstance(found[0], bytes) else b""
    if not hmac.compare_digest(sig, sign(value, secret)):
        return "forged-intent", f"the {HEADER} header does not sign this PurchaseIntent"
    return None


def key_file(settings: Settings) -> Path:
    """The stack's intent key (made, 0600 and random, on first use)."""
    from flashsale.kafka_auth import password_file

    return password_file(settings.secrets_dir, "intent-key")


def key_env(settings: Settings) -> dict[str, str]:
    """The environment that hands a process the intent key (nothing without auth)."""
    if settings.kafka_auth != "scram":
        return {}
    return {ENV_KEY_FILE: str(key_file(settings))}
