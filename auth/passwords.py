"""Staff passwords: argon2 through passlib (the `libpass` distribution). The only passlib user."""

from __future__ import annotations

from passlib.context import CryptContext

MIN_PASSWORD_LENGTH = 12
_context = CryptContext(schemes=["argon2"], deprecated="auto")
# Verified against when the user does not exist, so both answers take the same time.
_DUMMY_HASH = _context.hash("not-a-real-password-for-timing-only")


def hash_password(password: str) -> str:
    return str(_context.hash(password))


def verify_password(password: str, password_hash: str | None) -> bool:
    if password_hash is None:
        _context.verify(password, _DUMMY_HASH)
        return False
    try:
        return bool(_context.verify(password, password_hash))
    except (ValueError, TypeError):
        return False
