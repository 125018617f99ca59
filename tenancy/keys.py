"""API key format and hashing.

A full key is ``lpx_<prefix>_<secret>``. The prefix is public (stored, shown in listings,
used to look the key up); the secret is shown once and only its keyed hash is stored:
HMAC-SHA256 under the deployment's ``LORAPLEX_SECRET_KEY``, hex encoded.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string

KEY_PREFIX = "lpx"
PREFIX_LEN = 12  # lowercase hex characters
SECRET_BYTES = 32  # token_urlsafe(32): 43 characters of [A-Za-z0-9_-]

_HEX = frozenset(string.hexdigits.lower())
_SECRET_CHARS = frozenset(string.ascii_letters + string.digits + "-_")


def generate_key() -> tuple[str, str, str]:
    """A new key: ``(prefix, secret, full_key)``; store ``prefix`` and ``hash_secret(..)``."""
    prefix = secrets.token_hex(PREFIX_LEN // 2)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return prefix, secret, f"{KEY_PREFIX}_{prefix}_{secret}"


def hash_secret(secret_key: str, secret: str) -> str:
    """Keyed hash of a secret (HMAC-SHA256, hex); safe to store."""
    return hmac.new(secret_key.encode(), secret.encode(), hashlib.sha256).hexdigest()


def verify(secret_key: str, secret: str, stored_hash: str) -> bool:
    """Whether ``secret`` hashes to ``stored_hash``, compared in constant time."""
    return hmac.compare_digest(hash_secret(secret_key, secret), stored_hash)


def parse_key(full_key: str) -> tuple[str, str] | None:
    """``(prefix, secret)`` of a well-formed key, else None (the caller answers 401)."""
    parts = full_key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    prefix, secret = parts[1], parts[2]
    if len(prefix) != PREFIX_LEN or not set(prefix) <= _HEX:
        return None
    if not secret or len(secret) > 256 or not set(secret) <= _SECRET_CHARS:
        return None
    return prefix, secret
