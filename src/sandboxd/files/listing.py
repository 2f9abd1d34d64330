"""Directory listings: directories first, then by name in byte order.

Entries describe what a symlink points at, like ``ls -L``: a link to a
directory is listed as a directory. A link that cannot be followed (dangling,
a loop, or an unreadable target) is listed as a file with ``size`` null and
the link's own mtime. An entry that vanishes while the listing is taken is
left out.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

from .errors import NOT_A_DIRECTORY, FilesError, from_os_error


@dataclass(frozen=True, slots=True)
class Entry:
    name: str  # as the OS gave it (undecodable bytes kept as surrogates)
    is_dir: bool
    size: int | None
    modified_at: int | None  # epoch milliseconds

    def to_json(self) -> dict[str, Any]:
        return {
            # The client's JSON parser rejects lone surrogates, so a name that
            # is not UTF-8 is shown with U+FFFD instead of failing the listing.
            "name": os.fsencode(self.name).decode("utf-8", "replace"),
            "is_dir": self.is_dir,
            "size": self.size,
            "modified_at": self.modified_at,
        }


def list_dir(path: str) -> list[Entry]:
    try:
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise FilesError(NOT_A_DIRECTORY, f"Path is not a directory: {path}")
        with os.scandir(path) as it:
            entries = [e for e in map(_entry, it) if e is not None]
    except OSError as exc:
        raise from_os_error(exc, path) from None
    entries.sort(key=lambda e: (not e.is_dir, os.fsencode(e.name)))
    return entries


def _entry(dirent: os.DirEntry[str]) -> Entry | None:
    try:
        st = dirent.stat(follow_symlinks=True)
    except OSError:
        try:
            st = dirent.stat(follow_symlinks=False)
        except OSError:
            return None
        return Entry(dirent.name, False, None, st.st_mtime_ns // 1_000_000)
    is_dir = stat.S_ISDIR(st.st_mode)
    return Entry(dirent.name, is_dir, None if is_dir else st.st_size, st.st_mtime_ns // 1_000_000)
