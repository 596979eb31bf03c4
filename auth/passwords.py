"""Staff passwords: argon2id through passlib (the `libpass` distribution). The only passlib user.

The cost is the operator's choice (settings). The default, 64 MiB, 3 passes, 4 lanes, is RFC 9106's
second recommended option, several times OWASP's minimum (19 MiB, 2 passes): sign-ins are rare,
and a stolen hash should be expensive to guess. A hash records its own cost, so a stored password
still verifies after the cost is changed.
"""

from __future__ import annotations

from passlib.context import CryptContext

MIN_PASSWORD_LENGTH = 12


class PasswordHasher:
    def __init__(self, *, memory_kib: int = 65536, time_cost: int = 3, parallelism: int = 4):
        self._context = CryptContext(
            schemes=["argon2"],
            argon2__memory_cost=memory_kib,
            argon2__rounds=time_cost,
            argon2__parallelism=parallelism,
        )
        self._dummy_hash: str | None = None
        """Verified against when the user does not exist, so both answers take the same time.

        NOTE: made on the first such attempt, by hashing it (one argon2 run, as a verify is),
        not at start: each argon2 run holds its whole memory cost (64 MiB by default) for a
        moment, and every worker made one while starting, the largest part of its peak RSS.
        """

    def hash(self, password: str) -> str:
        return str(self._context.hash(password))

    def verify(self, password: str, password_hash: str | None) -> bool:
        if password_hash is None:
            if self._dummy_hash is None:
                self._dummy_hash = self.hash(password)
            else:
                self._context.verify(password, self._dummy_hash)
            return False
        try:
            return bool(self._context.verify(password, password_hash))
        except (ValueError, TypeError):
            return False
