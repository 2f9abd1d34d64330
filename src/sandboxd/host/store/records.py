"""Sandbox records in SQLite, with an in-memory copy that every read is served from.

Reads never touch the database (the SDK gives a GET about 3 s and retries), and
writes are single-row statements that finish in well under a millisecond, so
they run on the event loop. The partial unique index is the last word on names:
two live sandboxes of one namespace never share a name, even if a bug in the
caller tried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
from pathlib import Path

from ..model import LIVE, ApiError, Record

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    name TEXT,
    status TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS live_names ON sandboxes(namespace, name)
    WHERE name IS NOT NULL AND status IN ({", ".join(repr(str(s)) for s in sorted(LIVE))});
"""


# Ended records kept as the archive (archive.py); past this many the oldest go.
ARCHIVE_MAX_ENV = "SANDBOXD_ARCHIVE_MAX"
DEFAULT_ARCHIVE_MAX = 1000


def archive_max_from_env() -> int:
    raw = os.environ.get(ARCHIVE_MAX_ENV, "")
    try:
        return max(0, int(raw)) if raw else DEFAULT_ARCHIVE_MAX
    except ValueError:
        return DEFAULT_ARCHIVE_MAX


class NameTaken(ApiError):
    def __init__(self, name: str) -> None:
        super().__init__(409, "NAME_TAKEN", f"a live sandbox is already named {name!r}")


def connect_private(path: Path) -> sqlite3.Connection:
    """Open (or make) a database only root can read.

    Records name every sandbox, its network policy and its labels: nothing for
    other users of the machine. SQLite gives the ``-wal`` and ``-shm`` files the
    mode of the database file, so making that one 0600 first covers them.
    """
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600)  # made by an older version, world-readable
    return sqlite3.connect(path, isolation_level=None)


class Store:
    def __init__(self, path: Path, archive_max: int | None = None) -> None:
        self.archive_max = archive_max_from_env() if archive_max is None else archive_max
        self._db = connect_private(path)
        # WAL: a crash mid-write leaves the previous state, and readers of the
        # file (an operator's sqlite3 shell) do not block us.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._records: dict[str, Record] = {}
        for (data,) in self._db.execute("SELECT data FROM sandboxes"):
            rec = Record(**json.loads(data))
            self._records[rec.id] = rec

    def close(self) -> None:
        self._db.close()

    def all(self) -> list[Record]:
        return list(self._records.values())

    def get(self, namespace: str, ident: str) -> Record | None:
        """By id, or by name among live sandboxes (ids start "sbx-", names cannot)."""
        rec = self._records.get(ident)
        if rec is not None:
            return rec if rec.namespace == namespace else None
        for rec in self._records.values():
            if rec.namespace == namespace and rec.name == ident and rec.live:
                return rec
        return None

    def by_id(self, sandbox_id: str) -> Record | None:
        return self._records.get(sandbox_id)

    def name_taken(self, namespace: str, name: str, exclude: str | None = None) -> bool:
        return any(
            r.namespace == namespace and r.name == name and r.live and r.id != exclude
            for r in self._records.values()
        )

    def put(self, rec: Record) -> None:
        """Insert or update; raises :class:`NameTaken` if the name is in use."""
        if rec.name is not None and rec.live and self.name_taken(rec.namespace, rec.name, rec.id):
            raise NameTaken(rec.name)
        data = json.dumps(dataclasses.asdict(rec))
        try:
            self._db.execute(
                "INSERT INTO sandboxes(id, namespace, name, status, data) VALUES (?,?,?,?,?) "
                "ON CONFLICT(id) DO UPDATE SET name=excluded.name, status=excluded.status, "
                "data=excluded.data",
                (rec.id, rec.namespace, rec.name, rec.status, data),
            )
        except sqlite3.IntegrityError as exc:
            raise NameTaken(rec.name or "") from exc
        self._records[rec.id] = dataclasses.replace(rec)
        if not rec.live:
            self._evict_archived()

    def _evict_archived(self) -> None:
        """Keep at most ``archive_max`` ended records: the oldest ends go first."""
        ended = [r for r in self._records.values() if not r.live]
        if len(ended) <= self.archive_max:
            return
        ended.sort(key=lambda r: (r.terminated_at or r.created_at, r.id))
        for r in ended[: len(ended) - self.archive_max]:
            self._db.execute("DELETE FROM sandboxes WHERE id = ?", (r.id,))
            del self._records[r.id]

    def snapshot(self, sandbox_id: str) -> Record | None:
        """A copy the caller may change and then :meth:`put` back."""
        rec = self._records.get(sandbox_id)
        return dataclasses.replace(rec) if rec is not None else None
