"""User labels on sandboxes and pools, and the server-side query of the sandbox list.

Labels follow Kubernetes' rules (so a fleet's selectors mean the same here):

* a key is ``[prefix/]name``: ``name`` is 1-63 characters, letters, digits,
  ``-``, ``_`` and ``.``, beginning and ending with a letter or digit; the
  optional ``prefix`` is a DNS subdomain of at most 253 characters (lowercase
  labels joined by dots);
* a value is empty or 1-63 characters with the same rules as ``name``;
* at most :data:`MAX_LABELS` labels per sandbox or pool (Kubernetes has no
  count limit; a bound keeps a record, and the list, small).

Each refusal has its own code: ``INVALID_LABELS`` (not an object of strings),
``TOO_MANY_LABELS``, ``INVALID_LABEL_KEY``, ``INVALID_LABEL_VALUE``.

The list (``GET {P}/sandboxes``) takes ``status`` (repeatable or
comma-separated), ``label=k=v`` (repeatable, all must match; ``label=k``
asks only that the key is there), ``limit`` and ``cursor``. Without
``limit`` it answers every match as before (what the SDK's ``list()``
expects); with it, one page oldest first and ``next_cursor`` when more
follow. A cursor names the last sandbox seen (its creation time and id, as
the archive's do: archive.py), so sandboxes created or deleted between pages
neither repeat nor shift the pages.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..edge.errors import ApiError

if TYPE_CHECKING:  # model.py imports this module: its names are imported where used
    from .model import Record


def bad(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


MAX_LABELS = 64
MAX_PREFIX = 253

# fullmatch (never ``$``, which also matches before a final newline).
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

RULES = (
    "a key is [prefix/]name: name 1-63 letters, digits, '-', '_' or '.', beginning and ending "
    "with a letter or digit; prefix a DNS subdomain (lowercase, dots) of at most 253 characters"
)


def check_key(key: Any) -> str:
    if not isinstance(key, str):
        raise bad("INVALID_LABEL_KEY", f"label keys must be strings; {RULES}")
    prefix, slash, name = key.rpartition("/")
    ok = bool(_NAME.fullmatch(name))
    if slash:
        ok = ok and 0 < len(prefix) <= MAX_PREFIX
        ok = ok and all(_DNS_LABEL.fullmatch(part) for part in prefix.split("."))
    if not ok:
        raise bad("INVALID_LABEL_KEY", f"label key {key[:300]!r} is not valid: {RULES}")
    return key


def check_value(key: str, value: Any) -> str:
    if not isinstance(value, str) or (value and not _NAME.fullmatch(value)):
        shown = value[:100] if isinstance(value, str) else value
        raise bad(
            "INVALID_LABEL_VALUE",
            f"label {key!r} has value {shown!r}: a value is a string, empty or 1-63 letters, "
            "digits, '-', '_' or '.', beginning and ending with a letter or digit",
        )
    return value


def check_labels(value: Any) -> dict[str, str]:
    """``labels`` of a create, PATCH or pool → its stored form (None is no labels)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("INVALID_LABELS", 'labels must be an object of strings, e.g. {"team": "ml"}')
    if len(value) > MAX_LABELS:
        raise bad("TOO_MANY_LABELS", f"at most {MAX_LABELS} labels, got {len(value)}")
    return {check_key(k): check_value(k, v) for k, v in sorted(value.items())}


# -- the list's query ---------------------------------------------------------------


def parse_selector(raw: Iterable[str]) -> list[tuple[str, str | None]]:
    """``label=k=v`` (or ``label=k``, the key only) → (key, value or None) pairs."""
    out: list[tuple[str, str | None]] = []
    for item in raw:
        key, eq, value = item.partition("=")
        try:
            check_key(key)
            if eq:
                check_value(key, value)
        except ApiError as exc:
            raise bad(
                "INVALID_LABEL_SELECTOR",
                f"label={item!r}: give label=KEY=VALUE (or label=KEY for any value); {exc}",
            ) from None
        out.append((key, value if eq else None))
    return out


def parse_statuses(raw: Iterable[str]) -> set[str] | None:
    from .model import STATUSES

    wanted = {s.strip() for item in raw for s in item.split(",") if s.strip()}
    unknown = sorted(wanted - set(STATUSES))
    if unknown:
        raise bad(
            "INVALID_STATUS",
            f"unknown status {', '.join(unknown)}: use {', '.join(sorted(STATUSES))}",
        )
    return wanted or None


def matches(labels: Mapping[str, str], selector: list[tuple[str, str | None]]) -> bool:
    return all(k in labels and (v is None or labels[k] == v) for k, v in selector)


def key(rec: Record) -> tuple[int, str]:
    return (int(rec.created_at * 1000), rec.id)


def query(
    records: list[Record], namespace: str, params: Mapping[str, Any], getall: Any
) -> tuple[list[Record], str | None]:
    """The sandboxes the list answers (oldest first) and the next page's cursor.

    ``params``: the request's query; ``getall(name)`` its repeated values.
    Without ``status`` the live sandboxes, as the SDK's ``list()`` gets them.
    """
    from . import archive

    statuses = parse_statuses(getall("status"))
    selector = parse_selector(getall("label"))
    limit = archive.parse_limit(params["limit"]) if "limit" in params else None
    cursor = params.get("cursor")
    after = archive.decode(cursor) if cursor else None
    chosen = [
        r
        for r in records
        if r.namespace == namespace
        and (r.status in statuses if statuses is not None else r.live)
        and matches(r.labels, selector)
        and (after is None or key(r) > after)
    ]
    chosen.sort(key=key)
    if limit is None or len(chosen) <= limit:
        return chosen, None
    page = chosen[:limit]
    return page, archive.encode(key(page[-1]))
