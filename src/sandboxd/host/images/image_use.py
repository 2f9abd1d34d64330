"""Which images a host's state still refers to, read from its databases (read-only).

``sandboxd image prune`` runs beside a running (or stopped) ``sandboxd host``:
an image stays while a live sandbox record, a snapshot (a layer over its base
image) or a pool names it. Mounted overlays are checked separately by the
store (``images.in_use``), so a sandbox that runs is covered twice.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

from ..model import LIVE


def _rows(db: Path, sql: str) -> list[tuple[str, ...]]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql))
    except sqlite3.OperationalError:
        return []  # no such table: a state dir of an older version
    finally:
        conn.close()


def names_in_use(state_dir: Path) -> set[str]:
    names: set[str] = set()
    for status, data in _rows(state_dir / "sandboxes.db", "SELECT status, data FROM sandboxes"):
        if status in LIVE:
            with contextlib.suppress(ValueError, TypeError):
                names.add(str(json.loads(data)["image"]))
    for (data,) in _rows(state_dir / "catalog.db", "SELECT data FROM snapshots"):
        with contextlib.suppress(ValueError, TypeError, KeyError):
            names.add(str(json.loads(data)["base_image"]))
    for (data,) in _rows(state_dir / "catalog.db", "SELECT data FROM pools"):
        with contextlib.suppress(ValueError, TypeError, KeyError):
            names.add(str(json.loads(data)["image"]))
    return names
