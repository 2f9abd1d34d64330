"""Reading and writing the cgroup filesystem: the helpers every cgroup user shares.

Public on purpose: the process engine (``cgroups.py``) and the host's
per-sandbox cgroups use the same mount discovery, the same reading of
``/proc/self/cgroup`` and the same sweep-kill, from here.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path


def read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass(slots=True)
class Mounts:
    v1: dict[str, Path] = field(default_factory=dict)  # controller -> mount point
    v2: Path | None = None


def find_mounts() -> Mounts:
    mounts = Mounts()
    try:
        text = read(Path("/proc/self/mounts"))
    except OSError:
        return mounts
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        mnt, fstype, opts = Path(parts[1]), parts[2], parts[3].split(",")
        if fstype == "cgroup2" and mounts.v2 is None:
            mounts.v2 = mnt
        elif fstype == "cgroup":
            for ctrl in ("memory", "pids", "cpu"):
                if ctrl in opts:
                    mounts.v1.setdefault(ctrl, mnt)
    return mounts


def own_paths() -> tuple[dict[str, str], str | None]:
    v1: dict[str, str] = {}
    v2: str | None = None
    try:
        text = read(Path("/proc/self/cgroup"))
    except OSError:
        return v1, v2
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        if hid == "0" and ctrls == "":
            v2 = path
        for ctrl in ctrls.split(","):
            if ctrl in ("memory", "pids", "cpu"):
                v1[ctrl] = path
    return v1, v2


def own_dir(mount: Path, path: str) -> Path | None:
    candidate = mount / path.lstrip("/")
    if candidate.is_dir():
        return candidate
    # Inside a cgroup namespace the listed path may not match the mount; the
    # mount root is then our own cgroup.
    return mount if mount.is_dir() else None


def kill_dir(d: Path, rounds: int = 20) -> None:
    """Sweep-kill a cgroup without ``cgroup.kill``; forks racing it are caught by later rounds."""
    for _ in range(rounds):
        try:
            pids = [int(p) for p in read(d / "cgroup.procs").split()]
        except (OSError, ValueError):
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
