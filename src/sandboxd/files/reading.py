"""Opening a file for a read: one open, then every answer comes from that descriptor."""

from __future__ import annotations

import io
import os
import stat

from .errors import from_os_error, is_directory, not_regular


class FileReader:
    """A regular file opened for reading; construct on any thread, then :meth:`open`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = 0
        self.mtime_ns = 0
        self.blocks = 0
        self._file: io.FileIO | None = None

    @property
    def file(self) -> io.FileIO:
        assert self._file is not None, "open() first"
        return self._file

    @property
    def size_known(self) -> bool:
        """Whether ``size`` is the number of bytes a read will give.

        Pseudo-files have no blocks and a made-up size: 0 on procfs
        (/proc/meminfo has content), 4096 on sysfs (/sys/.../address has 18
        bytes). Those are read until EOF instead. A fully sparse file is
        taken for one too, which costs it sendfile and Range, not correctness.
        """
        return self.size > 0 and self.blocks > 0

    def open(self) -> None:
        """Open the file; symlinks on the way are followed.

        Directories and special files are refused before opening: opening a
        FIFO would block until a writer appears, and opening some devices has
        side effects. O_NONBLOCK covers a FIFO appearing between the two.
        """
        try:
            st = os.stat(self.path)
            if stat.S_ISDIR(st.st_mode):
                raise is_directory(self.path)
            if not stat.S_ISREG(st.st_mode):
                raise not_regular(self.path)
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise from_os_error(exc, self.path) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise not_regular(self.path)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        self.size, self.mtime_ns, self.blocks = st.st_size, st.st_mtime_ns, st.st_blocks
        self._file = io.FileIO(fd, "rb", closefd=True)

    def read(self, n: int) -> bytes:
        try:
            return self.file.read(n) or b""
        except OSError as exc:
            raise from_os_error(exc, self.path) from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
