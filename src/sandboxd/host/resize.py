"""Live resize: ``PATCH …/sandboxes/{id} {"resources": {cpus?, memory_mb?, disk_mb?}}``.

Applied at once, through the sandbox's cgroups and its loop disk, while its
processes run; the reply is the SandboxInfo with ``resource_resize``
``{generation, requested, status, error_message?}`` (``succeeded`` or
``failed``, never left ``pending``: nothing here takes long), which is what the
SDK's ``update()`` and ``wait_for_resource_resize`` read. ``resources`` is the
confirmed allocation: unchanged when the resize failed.

* **memory_mb**: two limits move together, the sandbox's (``memory_mb`` +
  the daemon's reserve) and the cap its daemon put on all its processes
  together (``memory_mb``, in its ``sandboxd-*`` child cgroup). Lowered child
  first and raised parent first, so the child never exceeds the parent. A
  shrink below what the processes hold fails cleanly: cgroup v1 refuses the
  write (EBUSY) after reclaiming what it can; on cgroup v2, which would
  OOM-kill instead, the unreclaimable usage is checked first. Every limit
  already written is then put back.
* **cpus**: the CFS quota; never fails.
* **disk_mb**: grows the loop-mounted ext4 online (the image file is
  extended, ``losetup -c``, ``resize2fs``); a shrink is refused (400), as
  ext4 cannot shrink while mounted.

Blocking calls: run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine import cgroupfs
from .model import Record, bad
from .runtime import bubblewrap as runtime
from .runtime import mounts
from .runtime.cgroup import CPU_PERIOD_US, SandboxCgroup, _set_memory_v1
from .states import Event

if TYPE_CHECKING:
    from .manager import Manager

log = logging.getLogger("sandboxd.host")

SUCCEEDED = "succeeded"
FAILED = "failed"


class ResizeFailed(Exception):
    """The resize could not be applied; nothing was changed (the message says why)."""


# -- memory ---------------------------------------------------------------------


def _memory_dirs(cg: SandboxCgroup) -> tuple[Path | None, bool]:
    """The sandbox's memory cgroup and whether it is v1."""
    if "memory" in cg.dirs:
        return cg.dirs["memory"], True
    if cg.unified is not None and "memory" in cg.h.v2_controllers:
        return cg.unified, False
    return None, False


def daemon_caps(whole: Path) -> list[Path]:
    """The cgroups the sandbox's daemon capped its processes in (not its own ``-daemon``)."""
    return sorted(
        d for d in whole.glob("sandboxd-*") if d.is_dir() and not d.name.endswith("-daemon")
    )


def _set(d: Path, limit: int, v1: bool) -> None:
    if v1:
        _set_memory_v1(d, limit)
    else:
        cgroupfs.write(d / "memory.max", str(limit))


def _usage(d: Path, v1: bool) -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(cgroupfs.read(d / ("memory.usage_in_bytes" if v1 else "memory.current")))
    return 0


def _unreclaimable(d: Path) -> int:
    """cgroup v2: what a limit cannot push out without killing (usage minus page cache)."""
    used = _usage(d, False)
    with contextlib.suppress(OSError, ValueError):
        for line in cgroupfs.read(d / "memory.stat").splitlines():
            key, _, value = line.partition(" ")
            if key == "file":
                return max(0, used - int(value))
    return used


def set_memory(cg: SandboxCgroup, old_mb: int, new_mb: int, reserve_mb: int) -> None:
    """Move the sandbox's limit and its daemon's cap; all or nothing (raises ResizeFailed)."""
    whole, v1 = _memory_dirs(cg)
    if whole is None or old_mb == new_mb:
        return
    kids = daemon_caps(whole)
    targets = [(d, old_mb << 20, new_mb << 20) for d in kids]
    parent = (whole, (old_mb + reserve_mb) << 20, (new_mb + reserve_mb) << 20)
    shrink = new_mb < old_mb
    steps = [*targets, parent] if shrink else [parent, *targets]
    if shrink and not v1:
        for d, _old, new in steps:
            held = _unreclaimable(d)
            if held > new:
                raise ResizeFailed(_too_small(new_mb, held, d is whole))
    done: list[tuple[Path, int]] = []
    try:
        for d, old, new in steps:
            _set(d, new, v1)
            done.append((d, old))
    except OSError as exc:
        for d, old in reversed(done):
            with contextlib.suppress(OSError):
                _set(d, old, v1)
        failed = steps[len(done)][0]
        if exc.errno == 16:  # EBUSY: the usage does not fit under the new limit
            raise ResizeFailed(_too_small(new_mb, _usage(failed, v1), failed is whole)) from exc
        raise ResizeFailed(f"cannot set the memory limit of {failed.name}: {exc}") from exc


def _too_small(new_mb: int, held: int, whole: bool) -> str:
    what = "the sandbox, its daemon included," if whole else "the sandbox's processes"
    return (
        f"memory_mb {new_mb} is below what {what} hold now ({held / (1 << 20):.0f} MiB "
        "that cannot be reclaimed); the limits are unchanged"
    )


# -- cpus -----------------------------------------------------------------------


def set_cpus(cg: SandboxCgroup, cpus: float) -> None:
    quota = max(1000, int(cpus * CPU_PERIOD_US))
    try:
        if "cpu" in cg.dirs:
            cgroupfs.write(cg.dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
        elif cg.unified is not None and "cpu" in cg.h.v2_controllers:
            cgroupfs.write(cg.unified / "cpu.max", f"{quota} {CPU_PERIOD_US}")
    except OSError as exc:
        raise ResizeFailed(f"cannot set the CPU quota: {exc}") from exc


# -- disk -----------------------------------------------------------------------


def loop_device(mountpoint: Path) -> str | None:
    """The block device mounted at ``mountpoint`` (its loop device), from mountinfo."""
    target = str(mountpoint.resolve())
    for m in mounts.table():
        if m.point == target:
            return m.source if m.source.startswith("/dev/loop") else None
    return None


CAP_SYS_RESOURCE = 24


def can_grow_disks() -> bool:
    """Online ext4 growth (the resize ioctl) needs CAP_SYS_RESOURCE, which some hosts drop."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("CapEff:"))
        return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, timeout=120)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).decode(errors="replace").strip()[-500:]
        raise ResizeFailed(f"{argv[0]} failed: {msg}")


def grow_disk(layout: runtime.Layout, old_mb: int, new_mb: int) -> bool:
    """Grow the sandbox's ext4 online; False when it has no disk (disk_mb not enforced)."""
    if new_mb == old_mb:
        return True
    dev = loop_device(layout.rw)
    if dev is None:
        return False
    try:
        os.truncate(layout.disk_image, new_mb << 20)
        _run(["losetup", "-c", dev])
        _run(["resize2fs", dev])
    except (ResizeFailed, OSError, subprocess.TimeoutExpired) as exc:
        # The filesystem did not grow: give the file its old size back.
        with contextlib.suppress(OSError, ResizeFailed, subprocess.TimeoutExpired):
            os.truncate(layout.disk_image, old_mb << 20)
            _run(["losetup", "-c", dev])
        raise ResizeFailed(f"growing the disk failed: {exc}") from exc
    return True


# -- the operation --------------------------------------------------------------


def apply(m: Manager, rec: Record, target: dict[str, Any]) -> None:
    """All of ``target`` or nothing: a later step failing puts the earlier ones back."""
    cg = m.cgroups.sandbox(rec.id) if m.cgroups.usable else None
    reserve = runtime.DAEMON_RESERVE_MB
    mem, cpus, disk_mb = target["memory_mb"], target["cpus"], target["disk_mb"]
    if cg is not None:
        set_memory(cg, rec.memory_mb, mem, reserve)
        try:
            if cpus != rec.cpus:
                set_cpus(cg, cpus)
            if disk_mb != rec.disk_mb and m.disks:
                grow_disk(m.layout(rec.id), rec.disk_mb, disk_mb)
        except ResizeFailed:
            with contextlib.suppress(ResizeFailed):
                set_cpus(cg, rec.cpus)
                set_memory(cg, mem, rec.memory_mb, reserve)
            raise
    elif disk_mb != rec.disk_mb and m.disks:
        grow_disk(m.layout(rec.id), rec.disk_mb, disk_mb)


# One resize of a sandbox at a time; a lock lives as long as someone holds or awaits it.
_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


async def resize(m: Manager, rec: Record, given: dict[str, Any]) -> Record:
    """Admit and apply a resize; the record carries its outcome in ``resource_resize``."""
    lock = _locks.get(rec.id)
    if lock is None:
        lock = _locks[rec.id] = asyncio.Lock()
    async with lock:
        return await _resize(m, rec, given)


async def _resize(m: Manager, rec: Record, given: dict[str, Any]) -> Record:
    cur = m.store.snapshot(rec.id)
    assert cur is not None
    m.admit(cur, Event.RESIZE)  # 409 NOT_RUNNING: a resize needs a running sandbox
    disk_mb = given.get("disk_mb", cur.disk_mb)
    if disk_mb < cur.disk_mb:
        raise bad(
            "DISK_SHRINK_UNSUPPORTED",
            f"disk_mb {disk_mb} is below the current {cur.disk_mb} MiB: a disk only grows "
            "(ext4 cannot shrink while mounted)",
        )
    if disk_mb > cur.disk_mb and m.disks and not can_grow_disks():
        raise bad(
            "DISK_RESIZE_UNSUPPORTED",
            "growing disk_mb live needs CAP_SYS_RESOURCE for the online ext4 resize, and "
            "this host's root does not have it; make a new sandbox (or restore a snapshot) "
            "with the disk_mb you need",
        )
    requested = {
        "cpus": float(given.get("cpus", cur.cpus)),
        "memory_mb": int(given.get("memory_mb", cur.memory_mb)),
        "disk_mb": int(disk_mb),
    }
    generation = int((cur.resource_resize or {}).get("generation", 0)) + 1
    t0 = time.monotonic()
    error: str | None = None
    try:
        await asyncio.to_thread(apply, m, cur, requested)
    except ResizeFailed as exc:
        error = str(exc)
    except OSError as exc:  # its cgroups went away: a DELETE during the resize
        error = f"the sandbox's cgroups could not be written: {exc}"
    ms = (time.monotonic() - t0) * 1000
    out = m.store.snapshot(rec.id)
    assert out is not None
    state: dict[str, Any] = {
        "generation": generation,
        "requested": requested,
        "status": FAILED if error else SUCCEEDED,
    }
    if error:
        state["error_message"] = error
        log.info("sandbox %s: resize %d failed in %.1f ms: %s", rec.id, generation, ms, error)
    else:
        out.cpus, out.memory_mb, out.disk_mb = (
            requested["cpus"],
            requested["memory_mb"],
            requested["disk_mb"],
        )
        log.info("sandbox %s: resized to %s in %.1f ms", rec.id, requested, ms)
    out.resource_resize = state
    m.store.put(out)
    return out
