"""Deleting one file. Directories are refused, empty or not.

A symlink is removed itself, never its target (like ``rm``).
"""

from __future__ import annotations

import os

from .errors import IS_DIRECTORY, FilesError, from_os_error


def delete_file(path: str) -> None:
    try:
        # unlink(2) answers EISDIR for a directory, which also covers a file
        # being swapped for a directory between a check and the call.
        os.unlink(path)
    except IsADirectoryError:
        raise FilesError(
            IS_DIRECTORY, f"Path is a directory, not a file: {path}. Only files can be deleted."
        ) from None
    except OSError as exc:
        raise from_os_error(exc, path) from None
