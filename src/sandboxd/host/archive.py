"""Terminated sandboxes as an archive: ``GET {P}/archived-sandboxes[/{id}]``.

An ended record (terminated or failed) stays in the sandbox store with its
outcome, resources, timings and image; the store evicts the oldest ones past
``SANDBOXD_ARCHIVE_MAX`` (store/records.py). The list is newest first and paged with
opaque cursors: ``next_cursor`` continues towards older records
(``direction=forward``, the default), ``prev_cursor`` back towards newer ones
(``direction=backward``). A cursor names the last record seen (its end time and
id), so records archived or evicted between pages neither repeat nor shift it.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from .model import ApiError, Record, bad, info

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000

Key = tuple[int, str]


def archived_at_ms(rec: Record) -> int:
    # The SDK reads archived_at as an unsigned integer (milliseconds here).
    return int((rec.terminated_at or rec.created_at) * 1000)


def key(rec: Record) -> Key:
    return (archived_at_ms(rec), rec.id)


def encode(k: Key) -> str:
    return base64.urlsafe_b64encode(json.dumps([k[0], k[1]]).encode()).decode()


def decode(cursor: str) -> Key:
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if isinstance(raw, list) and len(raw) == 2:
            at, sid = raw
            if isinstance(at, int) and isinstance(sid, str):
                return (at, sid)
    except (ValueError, binascii.Error):
        pass
    raise bad("INVALID_CURSOR", "cursor must be a prev_cursor or next_cursor of an earlier page")


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_LIMIT:
        raise bad("INVALID_LIMIT", f"limit must be an integer from 1 to {MAX_LIMIT}")
    return n


def archived_info(rec: Record) -> dict[str, Any]:
    out = info(rec, "")
    out["archived_at"] = archived_at_ms(rec)
    return out


def page(
    records: list[Record], limit: int, cursor: str | None, direction: str | None
) -> dict[str, Any]:
    """One page of ``records`` (ended ones of a namespace), newest first."""
    if direction not in (None, "forward", "backward"):
        raise bad("INVALID_DIRECTION", "direction must be 'forward' or 'backward'")
    ordered = sorted(records, key=key, reverse=True)  # newest first
    if cursor is None:
        start = 0
        chunk = ordered[:limit]
    else:
        at = decode(cursor)
        if direction == "backward":
            newer = [r for r in ordered if key(r) > at]
            chunk = newer[-limit:]
            start = len(newer) - len(chunk)
        else:
            start = sum(1 for r in ordered if key(r) >= at)
            chunk = ordered[start : start + limit]
    body: dict[str, Any] = {"sandboxes": [archived_info(r) for r in chunk]}
    if chunk and start + len(chunk) < len(ordered):
        body["next_cursor"] = encode(key(chunk[-1]))
    if chunk and start > 0:
        body["prev_cursor"] = encode(key(chunk[0]))
    return body


def find(records: list[Record], namespace: str, ident: str) -> Record:
    for r in records:
        if r.namespace == namespace and r.id == ident and not r.live:
            return r
    live = any(r.namespace == namespace and r.id == ident for r in records)
    if live:
        raise ApiError(
            409,
            "SANDBOX_NOT_ARCHIVED",
            f"sandbox {ident} is still live: read it with get(); it is archived once terminated",
        )
    raise ApiError(404, "SANDBOX_NOT_FOUND", f"no archived sandbox {ident!r} in {namespace!r}")
