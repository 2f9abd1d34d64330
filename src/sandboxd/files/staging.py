"""Atomic replacement of one file: write a hidden sibling, fsync, rename over the target.

Blocking; the upload driver (:mod:`.upload`) runs each step in a worker thread
and never two steps of one file at the same time.

Rules, in the order they apply:

* A symlink at the target is followed: the file it points at is replaced and
  the link is kept (what ``cp`` and ``echo >`` do). The temp file is created
  next to the real target so the rename never crosses filesystems.
* Missing parent directories are created (``mkdir -p``, mode 0777 minus umask).
* An existing target keeps its permission bits and, where the daemon may
  chown, its owner and group. A new file gets 0644 minus the daemon's umask.
  Extended attributes and ACLs are not carried over; other hard links to the
  old file keep the old content.
* Only a regular file is replaced: a directory gives IS_DIRECTORY, a device,
  FIFO or socket gives NOT_A_REGULAR_FILE (rename would swap /dev/null for a
  regular file).
* A target that cannot be renamed over because it is itself a mount point
  (EBUSY, e.g. Docker's bind-mounted /etc/hosts) or lies on another mount
  (EXDEV) is rewritten in place from the complete, fsynced temp file. That
  last step is not atomic, but an interrupted upload still cannot reach it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat

from .errors import (
    INVALID_PATH,
    NOT_A_DIRECTORY,
    FilesError,
    from_os_error,
    is_directory,
    not_regular,
)

NEW_FILE_MODE = 0o644
TEMP_SUFFIX = ".tmp"
TEMP_MARKER = ".sandboxd-"
# Leaves room for the marker and random part within NAME_MAX (255 bytes).
_NAME_KEEP = 200
# writev(2) takes at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_MAX = 1024
_COPY_CHUNK = 1 << 20


def temp_name(name: str) -> str:
    kept = os.fsencode(name)[:_NAME_KEEP].decode("utf-8", "ignore")
    return f".{kept}{TEMP_MARKER}{secrets.token_hex(6)}{TEMP_SUFFIX}"


class StagedFile:
    """One pending replacement of ``path``; construct on any thread, then :meth:`open`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.target = ""
        self.temp = ""
        self._fd = -1
        self._keep: os.stat_result | None = None
        self._done = False

    def open(self) -> None:
        try:
            self._open()
        except OSError as exc:
            raise from_os_error(exc, self.path) from None

    def _open(self) -> None:
        if os.path.isdir(self.path):
            raise is_directory(self.path)
        if self.path.endswith("/"):
            raise FilesError(INVALID_PATH, f"A file path cannot end with '/': {self.path}")
        self.target = os.path.realpath(self.path)
        parent, name = os.path.split(self.target)
        try:
            os.makedirs(parent, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise FilesError(
                NOT_A_DIRECTORY, f"A parent of the path is not a directory: {self.path}"
            ) from None
        try:
            self._keep = os.stat(self.target)
        except FileNotFoundError:
            self._keep = None
        if self._keep is not None:
            if stat.S_ISDIR(self._keep.st_mode):
                raise is_directory(self.path)
            if not stat.S_ISREG(self._keep.st_mode):
                raise not_regular(self.path)
        temp = os.path.join(parent, temp_name(name))
        self._fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, NEW_FILE_MODE)
        self.temp = temp

    def write(self, chunks: list[bytes]) -> None:
        """Write every byte of ``chunks``; short writes are resumed."""
        try:
            self._write(chunks)
        except OSError as exc:
            raise from_os_error(exc, self.path) from None

    def _write(self, chunks: list[bytes]) -> None:
        views = [memoryview(c) for c in chunks if c]
        while views:
            batch = views[:_IOV_MAX]
            n = os.writev(self._fd, batch)
            while n and views:
                if n >= len(views[0]):
                    n -= len(views.pop(0))
                else:
                    views[0] = views[0][n:]
                    n = 0

    def commit(self) -> None:
        """Make the temp file the target; on any failure the target is untouched."""
        try:
            self._commit()
        except OSError as exc:
            raise from_os_error(exc, self.path) from None

    def _commit(self) -> None:
        if self._keep is not None:
            with contextlib.suppress(PermissionError):  # only a privileged daemon may chown
                os.fchown(self._fd, self._keep.st_uid, self._keep.st_gid)
            # After fchown, which clears set-id bits.
            os.fchmod(self._fd, stat.S_IMODE(self._keep.st_mode))
        os.fsync(self._fd)
        try:
            os.rename(self.temp, self.target)
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.EXDEV):
                raise
            self._copy_in_place()
            self.discard()
            return
        self._done = True
        os.close(self._fd)
        self._fd = -1
        _fsync_dir(os.path.dirname(self.target))

    def _copy_in_place(self) -> None:
        with open(self.target, "r+b") as dst, open(self.temp, "rb") as src:
            while chunk := src.read(_COPY_CHUNK):
                dst.write(chunk)
            dst.truncate()
            dst.flush()
            os.fsync(dst.fileno())

    def discard(self) -> None:
        """Remove the temp file. Idempotent; a no-op after a successful commit."""
        # Runs while another error is being reported: it must not raise its own.
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if self.temp and not self._done:
            with contextlib.suppress(OSError):
                os.unlink(self.temp)
        self._done = True


def _fsync_dir(path: str) -> None:
    """Persist the rename itself; some filesystems cannot fsync a directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
