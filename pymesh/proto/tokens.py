"""Write tokens (BEP 5 ``announce_peer``, BEP 44 ``put``, pymesh ``pm_put``).

A token proves that the writer recently received a reply at the address it writes
from: it is a hash of a secret, the requester's IP and the target, so a token issued
for one target is rejected for another (as libtorrent does). Secrets rotate every
``rotate_every`` seconds and the previous one is still accepted, so a token lives
between one and two rotation periods.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Callable

TOKEN_LEN = 8


class TokenManager:
    def __init__(self, *, now: float, rotate_every: float = 300.0,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.rotate_every = rotate_every
        self._random = random_bytes
        self._secret = random_bytes(16)
        self._previous = random_bytes(16)
        self._rotated_at = now

    def _maybe_rotate(self, now: float) -> None:
        if now - self._rotated_at >= self.rotate_every:
            if now - self._rotated_at >= 2 * self.rotate_every:
                self._previous = self._random(16)  # both secrets are stale
            else:
                self._previous = self._secret
            self._secret = self._random(16)
            self._rotated_at = now

    @staticmethod
    def _make(secret: bytes, ip: str, target: bytes) -> bytes:
        return hashlib.sha1(secret + ip.encode("ascii", "replace") + b"|" + target).digest()[:TOKEN_LEN]

    def issue(self, ip: str, target: bytes, now: float) -> bytes:
        self._maybe_rotate(now)
        return self._make(self._secret, ip, target)

    def check(self, token: bytes, ip: str, target: bytes, now: float) -> bool:
        self._maybe_rotate(now)
        return any(hmac.compare_digest(token, self._make(s, ip, target))
                   for s in (self._secret, self._previous))
