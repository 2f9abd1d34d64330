"""Sandbox records in SQLite, with an in-memory copy that every read is served from.

Reads never touch the database (the SDK gives a GET about 3 s and retries), and
writes are single-row statements that finish in well under a millisecond, so
they run on the event loop. The partial unique index is the last word on names:
two live sandboxes of one namespace never share a name, even if a bug in the
caller tried.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

from .model import LIVE, ApiError, Record

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    name TEXT,
    status TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS live_names ON sandboxes(namespace, name)
    WHERE name IS NOT NULL AND status IN ({", ".join(repr(s) for s in sorted(LIVE))});
"""


class NameTaken(ApiError):
    def __init__(self, name: str) -> None:
        super().__init__(409, "NAME_TAKEN", f"a live sandbox is already named {name!r}")


class Store:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
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

    def snapshot(self, sandbox_id: str) -> Record | None:
        """A copy the caller may change and then :meth:`put` back."""
        rec = self._records.get(sandbox_id)
        return dataclasses.replace(rec) if rec is not None else None
