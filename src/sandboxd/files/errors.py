"""What can go wrong with a file operation, as machine codes the wire contract knows.

The HTTP layer maps each code to a status; this package never mentions HTTP.
"""

from __future__ import annotations

import errno
import os

NOT_FOUND = "NOT_FOUND"
IS_DIRECTORY = "IS_DIRECTORY"
NOT_A_DIRECTORY = "NOT_A_DIRECTORY"
NOT_A_REGULAR_FILE = "NOT_A_REGULAR_FILE"
INVALID_PATH = "INVALID_PATH"
PATH_TRAVERSAL = "PATH_TRAVERSAL"
PERMISSION_DENIED = "PERMISSION_DENIED"
READ_ONLY_FILESYSTEM = "READ_ONLY_FILESYSTEM"
INSUFFICIENT_STORAGE = "INSUFFICIENT_STORAGE"
FILE_TOO_LARGE = "FILE_TOO_LARGE"
FILE_BUSY = "FILE_BUSY"
INCOMPLETE_BODY = "INCOMPLETE_BODY"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
IO_ERROR = "IO_ERROR"


class FilesError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def is_directory(path: str) -> FilesError:
    return FilesError(
        IS_DIRECTORY,
        f"Path is a directory, not a file: {path}. "
        "Use /api/v1/files/list to list directory contents.",
    )


def not_regular(path: str) -> FilesError:
    return FilesError(NOT_A_REGULAR_FILE, f"Path is not a regular file: {path}")


def not_found(path: str) -> FilesError:
    return FilesError(NOT_FOUND, f"File not found: {path}")


_BY_ERRNO: dict[int, str] = {
    errno.ENOENT: NOT_FOUND,
    # A path component that is a file ("/etc/hostname/x"): nothing is there.
    errno.ENOTDIR: NOT_FOUND,
    errno.EISDIR: IS_DIRECTORY,
    errno.EACCES: PERMISSION_DENIED,
    errno.EPERM: PERMISSION_DENIED,
    errno.EROFS: READ_ONLY_FILESYSTEM,
    errno.ENOSPC: INSUFFICIENT_STORAGE,
    errno.EDQUOT: INSUFFICIENT_STORAGE,
    errno.ENAMETOOLONG: INVALID_PATH,
    errno.ELOOP: INVALID_PATH,
    errno.EFBIG: FILE_TOO_LARGE,
    errno.EBUSY: FILE_BUSY,
    errno.ETXTBSY: FILE_BUSY,
    # The daemon's limits, not the client's fault; same code as process starts.
    errno.EMFILE: RESOURCE_EXHAUSTED,
    errno.ENFILE: RESOURCE_EXHAUSTED,
    errno.ENOMEM: RESOURCE_EXHAUSTED,
}


def from_os_error(exc: OSError, path: str) -> FilesError:
    """Translate an OS error about ``path`` into the code a client can act on."""
    code = _BY_ERRNO.get(exc.errno or 0, IO_ERROR)
    if code == NOT_FOUND:
        return not_found(path)
    if code == IS_DIRECTORY:
        return is_directory(path)
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return FilesError(code, f"{reason}: {path}")
