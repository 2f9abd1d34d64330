"""API keys per namespace: made and revoked from the command line, read by the running host.

A key is ``sbk_<key id>_<secret>``: the id (8 hex digits) names the key in
``sandboxd host keys list`` and ``revoke``; the secret is 256 random bits. The
host's state dir keeps only ``sha256(key)`` (``apikeys.json``, mode 0600,
replaced atomically). A plain SHA-256 is enough here: slow, salted hashes
(bcrypt, scrypt) exist to make guessing *low-entropy passwords* from a stolen
hash expensive; a 256-bit random secret cannot be guessed from its hash at any
speed, so the hash only has to be one-way.

The running host looks at the file's identity (inode, size, mtime) on each
check and re-reads it when it changed, so a key made or revoked by the CLI
works (or stops working) on the next request, without a restart.

:class:`Authority` maps a presented key to a :class:`~sandboxd.edge.auth.Grant`:
the host's ``--token`` is the all-namespaces admin key, a key from the file
grants its one namespace, anything else nothing. Every comparison is
``hmac.compare_digest`` and every stored key is compared (no early exit), so
the time a check takes does not depend on how much of a key was right.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..edge.auth import ADMIN, Grant
from .model import check_namespace

FILE_NAME = "apikeys.json"
PREFIX = "sbk_"


@dataclass(frozen=True, slots=True)
class StoredKey:
    id: str
    namespace: str
    sha256: str  # hex of sha256(the whole key)
    created_at: float

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "namespace": self.namespace, "created_at": self.created_at}


class KeyError_(Exception):
    """A key operation the operator must fix (unknown id, bad namespace)."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def new_key(namespace: str) -> tuple[StoredKey, str]:
    """A fresh key for ``namespace``: its record (the hash only) and the key itself."""
    key_id = secrets.token_hex(4)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return StoredKey(key_id, namespace, hashlib.sha256(key.encode()).hexdigest(), time.time()), key


def match(digests: tuple[tuple[bytes, StoredKey], ...], key: str) -> StoredKey | None:
    """The stored key whose hash matches ``key``, comparing against every one."""
    given = digest(key)
    found: StoredKey | None = None
    for stored_digest, stored in digests:
        if hmac.compare_digest(given, stored_digest):
            found = stored
    return found


class KeyStore(Protocol):
    """Where a host's namespace keys come from: its state dir, or a fleet's etcd."""

    def lookup(self, key: str) -> StoredKey | None: ...

    def in_use(self) -> bool: ...


class KeyFile:
    """``<state dir>/apikeys.json``: the hashed keys, re-read when it changes."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._keys: tuple[StoredKey, ...] = ()
        self._digests: tuple[tuple[bytes, StoredKey], ...] = ()

    # -- reading (the host, on every check) -----------------------------------

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def keys(self) -> tuple[StoredKey, ...]:
        stamp = self._current_stamp()
        if stamp != self._stamp:
            with self._lock:
                self._keys = self._read() if stamp is not None else ()
                self._digests = tuple((bytes.fromhex(k.sha256), k) for k in self._keys)
                self._stamp = stamp
        return self._keys

    def _read(self) -> tuple[StoredKey, ...]:
        try:
            raw = json.loads(self.path.read_text())
            return tuple(StoredKey(**item) for item in raw.get("keys", []))
        except (OSError, ValueError, TypeError) as exc:
            # A broken file grants nothing (fail closed) and says why.
            raise KeyError_(f"{self.path} is unreadable: {exc}") from exc

    def lookup(self, key: str) -> StoredKey | None:
        """The stored key whose hash matches, comparing against every one."""
        try:
            self.keys()
        except KeyError_:
            return None
        return match(self._digests, key)

    def in_use(self) -> bool:
        """Whether keys were ever made here (the file exists, even emptied, or is broken)."""
        if self.path.exists() or self.path.is_symlink():
            return True
        try:
            return bool(self.keys())
        except KeyError_:
            return True  # a broken key file: closed, not open

    # -- writing (the CLI) ------------------------------------------------------

    def _write(self, keys: list[StoredKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"keys": [_as_dict(k) for k in keys]}, indent=1)
        fd, tmp = tempfile.mkstemp(prefix=".apikeys.", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(body + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _editing(self) -> Iterator[None]:
        """One CLI edit at a time (two ``keys create`` at once must not lose one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(".apikeys.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._stamp = None  # read what the previous editor wrote
            yield
        finally:
            os.close(fd)

    def create(self, namespace: str) -> tuple[StoredKey, str]:
        """A new key for ``namespace``: the record and the key itself (shown once)."""
        try:
            check_namespace(namespace)
        except Exception as exc:  # model.ApiError: say it as a CLI error
            raise KeyError_(f"namespace {namespace!r} is not a valid name") from exc
        stored, key = new_key(namespace)
        with self._editing():
            self._write([*self.keys(), stored])
        return stored, key

    def revoke(self, key_id: str) -> StoredKey:
        with self._editing():
            keys = list(self.keys())
            gone = [k for k in keys if k.id == key_id]
            if not gone:
                raise KeyError_(f"no key {key_id!r} (sandboxd host keys list shows the ids)")
            self._write([k for k in keys if k.id != key_id])
        return gone[0]


def _as_dict(k: StoredKey) -> dict[str, Any]:
    return {"id": k.id, "namespace": k.namespace, "sha256": k.sha256, "created_at": k.created_at}


class Authority:
    """Who a presented key is: the admin (``--token``), one namespace, or nobody."""

    def __init__(self, token: str | None, keys: KeyStore | None, always_required: bool) -> None:
        self._token = token.encode("utf-8", "surrogateescape") if token else None
        self._keys = keys
        self._always = always_required

    def use_keys(self, keys: KeyStore) -> None:
        """Take namespace keys from ``keys`` instead (a fleet node: etcd, fleet/apikeys.py)."""
        self._keys = keys

    def resolve(self, presented: str) -> Grant | None:
        """The web console and the auth middleware both call this."""
        given = presented.encode("utf-8", "surrogateescape")
        is_admin = self._token is not None and hmac.compare_digest(given, self._token)
        stored = self._keys.lookup(presented) if self._keys is not None else None
        if is_admin:
            return ADMIN
        return Grant(stored.namespace) if stored is not None else None

    def required(self) -> bool:
        """Whether a request without a valid key is refused.

        Yes with a token, in domain mode, or once keys were ever made (the key
        file exists, even with every key revoked or emptied: revoking the last
        key must not open the host to everyone); else the host is open as
        before (loopback only, docs/self-hosted.md).
        """
        if self._token is not None or self._always:
            return True
        return self._keys is not None and self._keys.in_use()
