"""Snapshot and pool records in SQLite (``<state-dir>/catalog.db``), served from memory.

The same discipline as :mod:`.store`: every read comes from an in-memory copy,
writes are single-row statements on the event loop (well under a millisecond,
WAL), so a restart finds every snapshot and pool again. One table per kind,
each row the record's JSON; the records themselves are dataclasses of
:mod:`.snapshots` and :mod:`.pools` with an ``id`` and a ``namespace``.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any, Generic, TypeVar

from .records import connect_private

T = TypeVar("T")

KINDS = ("snapshots", "pools")


class Catalog:
    def __init__(self, path: Path) -> None:
        self._db = connect_private(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        for kind in KINDS:
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {kind} ("
                "id TEXT PRIMARY KEY, namespace TEXT NOT NULL, data TEXT NOT NULL)"
            )

    def table(self, kind: str, cls: type[T]) -> Table[T]:
        assert kind in KINDS
        return Table(self._db, kind, cls)

    def close(self) -> None:
        self._db.close()


class Table(Generic[T]):
    """One kind of record: ``get``/``all`` from memory, ``put``/``delete`` write through."""

    def __init__(self, db: sqlite3.Connection, kind: str, cls: type[T]) -> None:
        self._db = db
        self._kind = kind
        self._cls = cls
        self._rows: dict[str, T] = {}
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for (data,) in db.execute(f"SELECT data FROM {kind}"):
            raw: dict[str, Any] = json.loads(data)
            # Fields a newer version added and this one does not know are dropped.
            row = cls(**{k: v for k, v in raw.items() if k in fields})
            self._rows[row.id] = row  # type: ignore[attr-defined]

    def get(self, ident: str) -> T | None:
        return self._rows.get(ident)

    def all(self) -> list[T]:
        return list(self._rows.values())

    def put(self, row: T) -> None:
        data = json.dumps(dataclasses.asdict(row))  # type: ignore[call-overload]
        rid: str = row.id  # type: ignore[attr-defined]
        self._db.execute(
            f"INSERT INTO {self._kind}(id, namespace, data) VALUES (?,?,?) "
            "ON CONFLICT(id) DO UPDATE SET data=excluded.data",
            (rid, row.namespace, data),  # type: ignore[attr-defined]
        )
        self._rows[rid] = dataclasses.replace(row)  # type: ignore[type-var]

    def delete(self, ident: str) -> None:
        self._db.execute(f"DELETE FROM {self._kind} WHERE id = ?", (ident,))
        self._rows.pop(ident, None)
