"""``disk_mb``: each sandbox's writable dirs live on a loop-mounted ext4 of that size.

A sparse file (a few MiB on disk while empty), ``mkfs.ext4`` without a journal
and with lazy init (~20 ms for 10 GiB here), mounted ``-o loop`` (the loop
device is freed by the kernel on unmount: autoclear). A full disk is ENOSPC
inside that sandbox only. Blocking calls: run them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

MKFS = "mkfs.ext4"


class DiskError(OSError):
    pass


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, timeout=60)
    if r.returncode != 0:
        msg = r.stderr.decode(errors="replace").strip()
        raise DiskError(f"{' '.join(argv[:2])} failed: {msg}")


def create(image: Path, mountpoint: Path, disk_mb: int) -> None:
    mountpoint.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(disk_mb << 20)
    _run(
        [
            MKFS,
            "-q",
            "-F",
            "-O",
            "^has_journal",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,root_owner=0:0",
            str(image),
        ]
    )
    _run(["mount", "-o", "loop,nosuid,nodev", str(image), str(mountpoint)])


def is_mounted(mountpoint: Path) -> bool:
    return os.path.ismount(mountpoint)


def remove(mountpoint: Path) -> None:
    """Unmount (the sandbox's processes are already dead); lazily if still busy."""
    if not is_mounted(mountpoint):
        return
    try:
        _run(["umount", str(mountpoint)])
    except DiskError:
        with contextlib.suppress(DiskError):
            _run(["umount", "-l", str(mountpoint)])
