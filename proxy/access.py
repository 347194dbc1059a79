"""Proofs that a credential may read a scope (a session or an execution).

A 200 from upstream for any artifact of a scope, asked with credential T, proves that T may read
that scope. We remember the proof for ``ttl`` seconds under an HMAC of T (never T itself), with a
secret generated once per cache directory and kept in a 0600 file. Proofs live on disk so they
survive restarts, and in memory so that a hit needs no disk access: :meth:`remembered` never
blocks and may run on the event loop; the other methods block: call them from a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
import time
from pathlib import Path

import diskcache

#: Proofs kept in memory at most.
MEMORY_PROOFS = 100_000
_SECRET_FILE = "secret"  # noqa: S105 (a file name)


def _load_or_create_secret(directory: Path) -> bytes:
    """The directory's HMAC secret, created on first use. The file is never reached through a
    symbolic link (O_NOFOLLOW), and its mode is set through the descriptor, never by path."""
    path = directory / _SECRET_FILE
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    # O_NONBLOCK: a FIFO planted under this name must not hang start-up (no effect on files).
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "r") as source:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file; remove it to start with a new secret")
        if stat.S_IMODE(info.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
        value = source.read().strip()
    if len(value) < 32:
        raise OSError(f"{path} is damaged; remove it to start with a new secret")
    return bytes.fromhex(value)


class AccessProofs:
    """HMAC-keyed, TTL-bounded proofs of (credential, scope) access, stored on disk."""

    def __init__(self, directory: str | Path, ttl: float) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ttl = ttl
        self._secret = _load_or_create_secret(self.directory)
        # Ours, before diskcache would create it 0755.
        (self.directory / "access").mkdir(exist_ok=True, mode=0o700)
        self._proofs = diskcache.Cache(
            str(self.directory / "access"), size_limit=64 * 1024**2, statistics=False
        )
        self._proofs.expire()
        #: (fingerprint, kind, id) -> expiry (time.time()); a cache of the disk proofs.
        self._recent: dict[tuple[str, str, str], float] = {}

    def fingerprint(self, authorization: str | None) -> str | None:
        """A stable, non-reversible name for a credential; ``None`` when there is none."""
        if not authorization:
            return None
        return hmac.new(self._secret, authorization.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def _key(fingerprint: str, scope_kind: str, scope_id: str) -> str:
        return json.dumps([fingerprint, scope_kind, scope_id], separators=(",", ":"))

    def remembered(self, fingerprint: str | None, scope_kind: str, scope_id: str) -> bool:
        """A live proof known in memory; False means "look on disk", not "no proof"."""
        if fingerprint is None:
            return False
        expiry = self._recent.get((fingerprint, scope_kind, scope_id))
        return expiry is not None and expiry > time.time()

    def _keep(self, fingerprint: str, scope_kind: str, scope_id: str, expiry: float) -> None:
        if len(self._recent) >= MEMORY_PROOFS:
            self._recent.clear()  # rare; the disk still has them all
        self._recent[(fingerprint, scope_kind, scope_id)] = expiry

    def has_proof(self, fingerprint: str | None, scope_kind: str, scope_id: str) -> bool:
        if fingerprint is None:
            return False
        if self.remembered(fingerprint, scope_kind, scope_id):
            return True
        found, expiry = self._proofs.get(
            self._key(fingerprint, scope_kind, scope_id), expire_time=True
        )
        if found is None:
            return False
        self._keep(fingerprint, scope_kind, scope_id, expiry or time.time() + self.ttl)
        return True

    def record(self, fingerprint: str | None, scope_kind: str, scope_id: str) -> None:
        if fingerprint is None:
            return
        self._proofs.set(self._key(fingerprint, scope_kind, scope_id), 1, expire=self.ttl)
        self._keep(fingerprint, scope_kind, scope_id, time.time() + self.ttl)

    def close(self) -> None:
        self._proofs.close()
