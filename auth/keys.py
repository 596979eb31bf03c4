"""API keys: `tsk_<key id>_<secret><checksum>`, stored only as HMAC-SHA256 under a pepper.

The key id is public (it is the key's `id` and shows in logs and on the dashboard) so a leaked
key can be traced; the checksum lets us refuse a mistyped or invented key without a lookup.
HMAC, not a password hash: a 190-bit random secret cannot be brute-forced, and the check must
cost microseconds on every request. This is the only module that uses `hmac` and `secrets`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import zlib
from dataclasses import dataclass

PREFIX = "tsk_"
_ALPHABET = string.digits + string.ascii_letters
_KEY_ID_LENGTH = 12
_SECRET_LENGTH = 32  # 62**32 ≈ 2**190
_CHECKSUM_LENGTH = 6  # 62**6 > 2**32: room for a whole CRC-32
_TOKEN_LENGTH = len(PREFIX) + _KEY_ID_LENGTH + 1 + _SECRET_LENGTH + _CHECKSUM_LENGTH
_ALPHABET_SET = frozenset(_ALPHABET)


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    token: str

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.key_id}"


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def _checksum(body: str) -> str:
    value = zlib.crc32(body.encode())
    digits = []
    for _ in range(_CHECKSUM_LENGTH):
        value, digit = divmod(value, len(_ALPHABET))
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def new_key_id() -> str:
    return _random(_KEY_ID_LENGTH)


def generate(key_id: str | None = None) -> NewKey:
    key_id = key_id or new_key_id()
    body = f"{PREFIX}{key_id}_{_random(_SECRET_LENGTH)}"
    return NewKey(key_id=key_id, token=body + _checksum(body))


def key_id_of(token: str) -> str | None:
    """The key id of a well-formed token whose checksum holds, else None (no lookup needed)."""
    if len(token) != _TOKEN_LENGTH or not token.startswith(PREFIX):
        return None
    key_id = token[len(PREFIX) : len(PREFIX) + _KEY_ID_LENGTH]
    separator = token[len(PREFIX) + _KEY_ID_LENGTH]
    rest = token[len(PREFIX) + _KEY_ID_LENGTH + 1 :]
    if separator != "_" or not _ALPHABET_SET.issuperset(key_id + rest):
        return None
    body = token[:-_CHECKSUM_LENGTH]
    if not hmac.compare_digest(_checksum(body), token[-_CHECKSUM_LENGTH:]):
        return None
    return key_id


def hash_key(token: str, pepper: str) -> str:
    return hmac.new(pepper.encode(), token.encode(), hashlib.sha256).hexdigest()


def matches(token: str, stored_hash: str, pepper: str) -> bool:
    return hmac.compare_digest(hash_key(token, pepper), stored_hash)
