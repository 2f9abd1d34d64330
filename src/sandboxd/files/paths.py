"""Turning the ``path`` query parameter into an absolute path, or refusing it."""

from __future__ import annotations

import os

from .errors import INVALID_PATH, PATH_TRAVERSAL, FilesError


def resolve(raw: str | None, base: str) -> str:
    """Absolute form of ``raw``; a relative path is taken against ``base``.

    Any ``..`` component is refused outright (the contract's PATH_TRAVERSAL)
    rather than normalised away, so the path a client names is the path it
    gets. ``.`` and repeated slashes are collapsed; a trailing slash is kept
    so that the OS can say "not a directory" for ``/etc/hostname/``.
    Symlinks are not resolved here: the daemon is not a chroot, and each
    operation decides how it treats them.
    """
    if not raw:
        raise FilesError(INVALID_PATH, "the 'path' query parameter is missing or empty")
    if "\x00" in raw:
        raise FilesError(INVALID_PATH, "the path contains a NUL byte")
    if ".." in raw.split("/"):
        raise FilesError(PATH_TRAVERSAL, "Path traversal detected: '..' is not allowed")
    resolved = os.path.normpath(os.path.join(base, raw))
    if resolved.startswith("//"):  # POSIX normpath keeps exactly two leading slashes
        resolved = "/" + resolved.lstrip("/")
    if raw.endswith("/") and not resolved.endswith("/"):
        resolved += "/"
    return resolved
