"""Proofs that a credential may read a scope (a session or an execution), and split scopes.

A 200 from upstream for any artifact of a scope, asked with credential T, proves that T may read
that scope (with ``access_check = "object"``, only that object: the proof's scope is then the
triple (kind, scope id, object id)). To read bytes another credential F stored there, T also
needs a proof ``(*scope, "filled-by", F)``: one check whose answer agreed with F's entry (see
:mod:`proxy.validators`). So if two accounts ever held the same scope id, what one filled is
never served to the other on the strength of a proof the other got from its own fills.

We remember each proof for ``ttl`` seconds under an HMAC of T (never T itself), with a secret
generated once per cache directory and kept in a 0600 file. Proofs live on disk so they survive
restarts, and in memory so that a hit needs no disk access.

A proof is void once revoked (``vlmrun-cache revoke``): ``revocations.jsonl`` lists credentials
(by fingerprint, or ``*`` for all) and a time; proofs recorded before it no longer count, in
memory or on disk. Every lookup that would succeed checks the file's identity and size first (one
``stat``, about a microsecond; at most every :data:`~proxy.store.RECHECK_SECONDS`) and reloads it
when it changed; ``revoke`` waits that long before it returns, so a revocation by any process
holds for every request of every worker once the command has returned.

A scope is *split* once two credentials were answered differently for the same key (see
:mod:`proxy.validators`): the same scope id then names different things for different accounts,
so from then on each credential gets its own copy of that scope's entries. Split scopes are kept
on disk for good and reloaded by :meth:`AccessProofs.refresh` (other worker processes split too).

:meth:`remembered` and :meth:`is_split` never block and may run on the event loop; the other
methods block: call them from a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import sqlite3
import stat
import time
from collections.abc import Mapping
from pathlib import Path

import diskcache

from proxy.config import SECRET_ENV, ConfigError
from proxy.errors import BadRequest
from proxy.store import RECHECK_SECONDS

_PRINTABLE_ASCII = re.compile(rb"[\x20-\x7e]*")
#: Credentials whose fingerprints are remembered at most.
MEMORY_FINGERPRINTS = 4096
#: Proofs kept in memory at most.
#: A proof on disk is rewritten when this fraction of ``ttl`` has passed since it was written.
REWRITE_FRACTION = 0.1
MEMORY_PROOFS = 100_000
#: Expired proofs deleted from disk per call of :meth:`AccessProofs.expire` (~10 ms).
EXPIRE_BATCH = 2000
#: A proof's scope: (kind, scope id), or (kind, scope id, object id) for per-object checks.
ProofScope = tuple[str, ...]
#: The proof kept for "the API accepted this credential for something".
ANY_SCOPE: ProofScope = ("*",)
_ANY = ANY_SCOPE
_SPLITS_FILE = "splits.jsonl"
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
_SECRET_FILE = "secret"  # noqa: S105 (a file name)
#: In the cache directory: revoked proofs (see :class:`Revocations`).
REVOCATIONS_FILE = "revocations.jsonl"


def _load_or_create_secret(directory: Path) -> bytes:
    """The directory's HMAC secret, created on first use. The file is never reached through a
    symbolic link (O_NOFOLLOW), and its mode is set through the descriptor, never by path.

    It is written whole under a name of its own and then linked into place (``link`` never
    replaces a file): a worker starting beside another never reads a secret half written, and
    of two workers creating it at once, both end up with the one that was linked first."""
    path = directory / _SECRET_FILE
    if not os.path.lexists(path):
        draft = directory / f".{_SECRET_FILE}-{secrets.token_hex(8)}"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
                out.flush()
                os.fsync(out.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(draft, path, follow_symlinks=False)
        finally:
            os.unlink(draft)
    return _read_secret(path, tighten=True)


def shared_secret(secret_file: str, environ: Mapping[str, str]) -> bytes | None:
    """The HMAC secret every replica shares (``VLMRUN_CACHE_SECRET``, else ``secret_file``),
    or None to use the cache directory's own. Used as given (any text of 32 characters or
    more); never stored anywhere by the proxy, Redis least of all."""
    value = environ.get(SECRET_ENV, "").strip()
    where = f"environment variable {SECRET_ENV}"
    if not value and secret_file:
        where = f"secret_file {secret_file}"
        try:
            fd = os.open(secret_file, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(fd, "r", encoding="utf-8") as source:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ConfigError(f"secret_file: {secret_file} is not a regular file")
                value = source.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"secret_file: cannot read {secret_file}: {exc}") from None
    if not value:
        return None
    if len(value) < 32:
        raise ConfigError(f"secret_file: the secret in {where} is shorter than 32 characters")
    return value.encode()


def existing_secret(directory: str | Path) -> bytes | None:
    """The directory's HMAC secret for an operator's command: read only (never created, its
    mode never changed); None if there is none, in which case nothing was ever proven here."""
    try:
        return _read_secret(Path(directory) / _SECRET_FILE, tighten=False)
    except FileNotFoundError:
        return None


def _read_secret(path: Path, tighten: bool) -> bytes:
    # O_NONBLOCK: a FIFO planted under this name must not hang start-up (no effect on files).
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "r") as source:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file; remove it to start with a new secret")
        if tighten and stat.S_IMODE(info.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
        value = source.read().strip()
    if len(value) < 32:
        raise OSError(f"{path} is damaged; remove it to start with a new secret")
    return bytes.fromhex(value)


def fingerprint_with(secret: bytes, authorization: str | None) -> str | None:
    """A stable, non-reversible name for a credential; ``None`` when there is none."""
    if not authorization:
        return None
    return _hmac(secret, authorization)


def _hmac(secret: bytes, authorization: str) -> str:
    return hmac.new(secret, _canonical(authorization).encode(), hashlib.sha256).hexdigest()


def _canonical(authorization: str) -> str:
    """The credential as the API reads it. Its ``HTTPBearer`` takes the scheme in any case, so
    ``bearer K`` is the key of ``Bearer K``: it must have the same fingerprint, or one key could
    spell its scheme 64 ways and hold 64 shares of every per-key limit. (The token, after the
    first space, is taken verbatim, as the API takes it.)"""
    scheme, space, token = authorization.partition(" ")
    if space and scheme != "Bearer" and scheme.lower() == "bearer":
        return "Bearer " + token
    return authorization


def credential(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The request's ``Authorization``; one at most, in printable ASCII, or a 400."""
    found: bytes | None = None
    for name, value in headers:
        if name.lower() == b"authorization":
            if found is not None:
                raise BadRequest("Give the Authorization header once")
            if _PRINTABLE_ASCII.fullmatch(value) is None:
                raise BadRequest("The Authorization header must be printable ASCII")
            found = value
    return None if found is None else found.decode("ascii")


class AccessProofs:
    """HMAC-keyed, TTL-bounded proofs of (credential, scope) access, stored on disk."""

    def __init__(
        self,
        directory: str | Path,
        ttl: float,
        offline_ttl: float = 0.0,
        secret: bytes | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ttl = ttl
        #: How old a proof may be while the API cannot be reached (at least ``ttl``).
        self.offline_ttl = max(ttl, offline_ttl)
        #: The replicas' shared secret, or the directory's own (created on first use).
        self._secret = secret or _load_or_create_secret(self.directory)
        # Ours, before diskcache would create it 0755.
        (self.directory / "access").mkdir(exist_ok=True, mode=0o700)
        self._proofs = diskcache.Cache(
            str(self.directory / "access"),
            # Never cull live proofs for room: expired ones go by :meth:`expire` instead.
            size_limit=2**62,
            cull_limit=0,
            statistics=False,
        )
        # Expired proofs go by :meth:`expire`, a bounded batch at a time: not here, where a
        # backlog (200k expired proofs: 1.4 s) would delay start-up.
        self._proofs_db = self.directory / "access" / "cache.db"
        self._fingerprints: dict[str, str] = {}
        #: (fingerprint, *scope) -> when it was proven (time.time()); a cache of the disk proofs.
        self._recent: dict[tuple[str, ...], float] = {}
        #: (fingerprint, *scope) -> when this process last wrote its proof to disk.
        self._written: dict[tuple[str, ...], float] = {}
        #: (kind, scope id) of every split scope.
        self._split: frozenset[tuple[str, str]] = frozenset()
        self._splits_path = self.directory / _SPLITS_FILE
        self._splits_size = -1
        self.revocations = Revocations(self.directory)
        self.refresh()

    def fingerprint(self, authorization: str | None) -> str | None:
        """A stable, non-reversible name for a credential; ``None`` when there is none.

        Remembered for the last :data:`MEMORY_FINGERPRINTS` credentials (in this process's
        memory only): an HMAC per request is a measurable share of a small hit."""
        if not authorization:
            return None
        known = self._fingerprints.get(authorization)
        if known is None:
            if len(self._fingerprints) >= MEMORY_FINGERPRINTS:
                self._fingerprints.clear()
            known = _hmac(self._secret, authorization)
            self._fingerprints[authorization] = known
        return known

    @staticmethod
    def _key(fingerprint: str, scope: ProofScope) -> str:
        return json.dumps([fingerprint, *scope], separators=(",", ":"))

    def remembered(self, fingerprint: str | None, scope: ProofScope, offline: bool = False) -> bool:
        """A live proof known in memory; False means "look on disk", not "no proof".

        A proof is live for ``ttl`` after it was recorded, or ``offline_ttl`` with ``offline``
        (while the API cannot be reached to check again).
        """
        if fingerprint is None:
            return False
        proven = self._recent.get((fingerprint, *scope))
        if proven is None or time.time() - proven >= self._max_age(offline):
            return False
        return not self.revocations.voids(fingerprint, proven)

    def _max_age(self, offline: bool) -> float:
        return self.offline_ttl if offline else self.ttl

    def _keep(self, fingerprint: str, scope: ProofScope, proven: float) -> None:
        if len(self._recent) >= MEMORY_PROOFS:
            self._recent.clear()  # rare; the disk still has them all
        self._recent[(fingerprint, *scope)] = proven

    def has_proof(self, fingerprint: str | None, scope: ProofScope, offline: bool = False) -> bool:
        if fingerprint is None:
            return False
        if self.remembered(fingerprint, scope, offline):
            return True
        found = self._proofs.get(self._key(fingerprint, scope))
        if not isinstance(found, int):  # absent (or from an older layout)
            return False
        proven = found / 1000
        if self.revocations.voids(fingerprint, proven):
            return False
        self._keep(fingerprint, scope, proven)
        return time.time() - proven < self._max_age(offline)

    def has_any_proof(self, fingerprint: str | None, offline: bool = False) -> bool:
        """Whether the API accepted this credential for anything lately: one lookup, no scan."""
        return self.has_proof(fingerprint, _ANY, offline)

    def record(self, fingerprint: str | None, *scopes: ProofScope, on_loop: bool = False) -> bool:
        """Remember that the API just accepted ``fingerprint`` for each of ``scopes``.

        In memory every time; on disk (where other workers and the next start read it) at
        most once per :data:`REWRITE_FRACTION` of ``ttl`` per proof: every miss of one key in
        one session proves the same thing, and two SQLite transactions per miss were a
        measurable share of a miss (bench/misses.py). A proof on disk is so at most that much
        older than the last acceptance, which only makes it expire sooner, never later; a
        revocation since it was written has it rewritten at once.

        With ``on_loop`` (the caller is the event loop) nothing is written: when a write to
        disk is due, it only keeps the proof in memory and returns False, and the caller calls
        again from a worker thread. So most misses record their proof without a thread hop, and
        a hit of this process right after never waits for that write (it asked the API again
        when it came first, one upstream request more under load)."""
        if fingerprint is None:
            return True
        now = time.time()
        rewrite = self.ttl * REWRITE_FRACTION
        due = []
        for scope in (*scopes, _ANY):
            written = self._written.get((fingerprint, *scope), -math.inf)
            # A revocation since (``revoke``, in any process) voided the copy on disk.
            if now - written >= rewrite or self.revocations.voids(fingerprint, written):
                due.append(scope)
        if due and on_loop:
            for scope in (*scopes, _ANY):
                self._keep(fingerprint, scope, now)
            return False
        for scope in due:
            # An int (milliseconds): diskcache stores it as is; floats it would pickle.
            self._proofs.set(
                self._key(fingerprint, scope), int(now * 1000), expire=self.offline_ttl
            )
            if len(self._written) >= MEMORY_PROOFS:
                self._written.clear()
            self._written[(fingerprint, *scope)] = now
        for scope in (*scopes, _ANY):
            self._keep(fingerprint, scope, now)
        return True

    def adopt(self, fingerprint: str, scope: ProofScope, proven: float) -> bool:
        """Take over a proof another replica recorded at ``proven`` (via the shared tier),
        unless it is too old or revoked here; True if it now counts."""
        proven = min(proven, time.time())  # another replica's clock may run ahead
        if time.time() - proven >= self.ttl or self.revocations.voids(fingerprint, proven):
            return False
        expire = self.offline_ttl - (time.time() - proven)
        self._proofs.set(self._key(fingerprint, scope), int(proven * 1000), expire=expire)
        self._keep(fingerprint, scope, proven)
        return True

    def expire(self, limit: int = EXPIRE_BATCH) -> int:
        """Delete up to ``limit`` proofs too old to count even offline from disk, the oldest
        first, in one short transaction; returns how many. Blocks; call it every second or so:
        a backlog drains a batch at a time, beside the server's own writes. (Expired proofs
        are never served meanwhile: a lookup checks the expiry time. Live proofs are never
        removed for room: the disk store has no size limit.)"""
        with contextlib.closing(sqlite3.connect(self._proofs_db, timeout=5)) as db, db:
            return db.execute(
                "DELETE FROM Cache WHERE rowid IN (SELECT rowid FROM Cache"
                " WHERE expire_time IS NOT NULL AND expire_time < ? ORDER BY expire_time LIMIT ?)",
                (time.time(), limit),
            ).rowcount

    def forget_stale(self) -> int:
        """Drop proofs too old to count even offline from memory; returns how many."""
        oldest = time.time() - self.offline_ttl
        stale = [scope for scope, proven in list(self._recent.items()) if proven <= oldest]
        for scope in stale:
            self._recent.pop(scope, None)
        return len(stale)

    # -- split scopes -------------------------------------------------------------------------

    def is_split(self, scope_kind: str, scope_id: str) -> bool:
        return (scope_kind, scope_id) in self._split

    def split(self, scope_kind: str, scope_id: str) -> None:
        """Mark a scope split, for good: in this process at once, on disk for the others."""
        self._split = self._split | {(scope_kind, scope_id)}
        line = json.dumps([scope_kind, scope_id], separators=(",", ":")) + "\n"
        fd = os.open(self._splits_path, _APPEND_FLAGS, 0o600)
        try:
            os.write(fd, line.encode())  # one O_APPEND write: lines never interleave
        finally:
            os.close(fd)

    def refresh(self) -> None:
        """Reload split scopes from disk if another process added some (a stat when not)."""
        try:
            fd = os.open(self._splits_path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        with os.fdopen(fd, "rb") as file:
            size = os.fstat(fd).st_size
            if size == self._splits_size:
                return
            lines = file.read(size).splitlines()
        found = set(self._split)
        for line in lines:
            with contextlib.suppress(ValueError, TypeError):
                kind, scope_id = json.loads(line)
                found.add((str(kind), str(scope_id)))
        self._split, self._splits_size = frozenset(found), size

    def close(self) -> None:
        self._proofs.close()


class Revocations:
    """``revocations.jsonl``: lines ``{"fingerprint": <fingerprint or "*">, "before": <time>}``,
    appended by ``vlmrun-cache revoke``. A proof of a listed credential (any, for ``*``) recorded
    before that time (seconds since the epoch) is void.

    :meth:`voids` never blocks beyond one ``stat`` (and a reload of a few lines when the file
    changed): it runs on the event loop, before a proof held in memory is trusted. A file that
    cannot be read voids every proof (credentials are then checked with the API) until it can.
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / REVOCATIONS_FILE
        #: (inode, size) of the file as last read; None before it exists.
        self._seen: tuple[int, int] | None = None
        #: Proofs of every credential recorded before this are void.
        self._all = 0.0
        #: Per fingerprint, proofs recorded before this are void.
        self._keys: dict[str, float] = {}
        #: When (time.monotonic()) the file was last read or seen unchanged.
        self._looked = float("-inf")

    def voids(self, fingerprint: str, proven: float) -> bool:
        """True if a proof of ``fingerprint`` recorded at ``proven`` was revoked. The file is
        looked at again once :data:`~proxy.store.RECHECK_SECONDS` have passed since the last
        good look (``revoke`` waits that long before it returns)."""
        now = time.monotonic()
        if now - self._looked >= RECHECK_SECONDS:
            if not self._current():
                return True
            self._looked = now
        return proven < self._all or proven < self._keys.get(fingerprint, 0.0)

    def _current(self) -> bool:
        """Reload the file if it changed; False if it cannot be read."""
        try:
            info = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return True  # never revoked; what was read before still holds
        except OSError:
            return False
        if (info.st_ino, info.st_size) == self._seen:
            return True
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as file:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    return False
                lines = file.read(info.st_size).splitlines()
        except OSError:
            return False
        for line in lines:  # only ever later: a revocation cannot be taken back by an edit
            with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
                record = json.loads(line)
                who, before = str(record["fingerprint"]), float(record["before"])
                if who == "*":
                    self._all = max(self._all, before)
                else:
                    self._keys[who] = max(self._keys.get(who, 0.0), before)
        self._seen = (info.st_ino, info.st_size)
        return True

    @staticmethod
    def append(directory: str | Path, fingerprint: str | None, before: float) -> None:
        """Revoke the proofs of ``fingerprint`` (every credential's for None) recorded before
        ``before``: one line, written with one ``O_APPEND`` write (lines never interleave)."""
        record = {"fingerprint": fingerprint or "*", "before": before}
        line = json.dumps(record, separators=(",", ":")) + "\n"
        fd = os.open(Path(directory) / REVOCATIONS_FILE, _APPEND_FLAGS, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
