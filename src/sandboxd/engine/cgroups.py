"""One cgroup per process: memory limit, OOM attribution, pids limit, tree kill.

The daemon finds the hierarchies it may write to (``/proc/self/mounts`` and
``/proc/self/cgroup``) and makes one parent cgroup for itself in each,
``sandboxd-<pidns>-<pid>``, holding one child per process, ``p<handle>``. Three layouts
occur in practice and all are handled:

* **hybrid** (this project's machines): memory and pids on cgroup v1, with a
  controller-less cgroup2 mounted at ``/sys/fs/cgroup/unified``. Limits and the
  OOM counter come from v1; ``cgroup.kill`` comes from v2.
* **v2 only**: memory, pids and ``cgroup.kill`` all in one tree. v2 forbids
  processes in a cgroup whose children get controllers, so when the daemon's
  own cgroup is not the root it first moves itself into a ``sandboxd-<pid>-daemon``
  leaf (what systemd's ``Delegate=`` services do).
* **none** (no writable cgroupfs, e.g. an unprivileged container): no cgroup is
  made, OOM kills show up as plain SIGKILLs, and tree kill falls back to the
  process group. :meth:`CgroupLayout.describe` says which layout is in force.

A process joins its cgroups *before* it execs (see ``spawn.py``), so every byte
it allocates and every child it forks is accounted from the start.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

# The filesystem helpers live in cgroupfs.py; the old private names stay for
# callers that have not moved to the public module yet.
from .cgroupfs import find_mounts as _find_mounts
from .cgroupfs import kill_dir as _kill_dir
from .cgroupfs import own_dir as _own_dir
from .cgroupfs import own_paths as _own_paths
from .cgroupfs import read as _read
from .cgroupfs import write as _write

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _mem_total() -> int:
    try:
        for line in _read(Path("/proc/meminfo")).splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 1 << 62


def _counter(text: str, key: str) -> int:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


class CgroupLayout:
    """The daemon's parent cgroups, one per usable hierarchy."""

    def __init__(self, tag: str | None = None) -> None:
        # The pids and v2 roots may be shared with other sandboxes on the host,
        # whose pids we cannot see: the pid namespace makes the tag ours alone.
        self.tag = tag or f"sandboxd-{_pidns()}-{os.getpid()}"
        self.memory_v1: Path | None = None
        self.pids_v1: Path | None = None
        self.unified: Path | None = None
        self.unified_controllers: set[str] = set()
        self._memory_base: Path | None = None  # our own cgroup in the memory hierarchy
        # All children share one CPU group (no per-process cpu cgroup): the
        # daemon's weight against all of them together is what matters.
        self.cpu_v1: Path | None = None

    @classmethod
    def detect(cls, enabled: bool = True, tag: str | None = None) -> CgroupLayout:
        layout = cls(tag)
        if enabled:
            layout._setup()
        return layout

    def _setup(self) -> None:
        mounts = _find_mounts()
        own_v1, own_v2 = _own_paths()
        for ctrl in ("memory", "pids", "cpu"):
            mnt = mounts.v1.get(ctrl)
            if mnt is None or ctrl not in own_v1:
                continue
            base = _own_dir(mnt, own_v1[ctrl])
            parent = self._make_parent(base) if base else None
            if ctrl == "memory":
                self.memory_v1 = parent
                self._memory_base = base
            elif ctrl == "pids":
                self.pids_v1 = parent
            else:
                self.cpu_v1 = parent
        if mounts.v2 is not None and own_v2 is not None:
            base = _own_dir(mounts.v2, own_v2)
            if base is not None:
                self._setup_unified(base)

    def _make_parent(self, base: Path) -> Path | None:
        _remove_stale_parents(base)
        parent = base / self.tag
        try:
            parent.mkdir(exist_ok=True)
        except OSError as exc:
            log.info("cgroup %s not usable: %s", base, exc)
            return None
        return parent

    def _setup_unified(self, base: Path) -> None:
        parent = self._make_parent(base)
        if parent is None:
            return
        self.unified = parent
        try:
            available = set(_read(base / "cgroup.controllers").split())
        except OSError:
            available = set()
        wanted = {c for c in ("memory", "pids", "cpu") if c in available}
        # Controllers already provided by v1 are not used from v2.
        if self.memory_v1 is not None:
            wanted.discard("memory")
        if self.pids_v1 is not None:
            wanted.discard("pids")
        if self.cpu_v1 is not None:
            wanted.discard("cpu")
        if not wanted:
            return
        enable = " ".join(f"+{c}" for c in sorted(wanted))
        try:
            try:
                _write(base / "cgroup.subtree_control", enable)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                # "No internal processes": move ourselves into a leaf first.
                leaf = base / f"{self.tag}-daemon"
                leaf.mkdir(exist_ok=True)
                _write(leaf / "cgroup.procs", str(os.getpid()))
                _write(base / "cgroup.subtree_control", enable)
            _write(parent / "cgroup.subtree_control", enable)
            self.unified_controllers = wanted
            if "memory" in wanted:
                self._memory_base = base
        except OSError as exc:
            log.info("cgroup v2 controllers %s not delegated: %s", enable, exc)

    # --- queries ---

    @property
    def has_kill(self) -> bool:
        # cgroup.kill exists in every non-root v2 cgroup since Linux 5.14.
        return self.unified is not None and (self.unified / "cgroup.kill").exists()

    @property
    def enabled(self) -> bool:
        return bool(self.memory_v1 or self.pids_v1 or self.unified or self.cpu_v1)

    def describe(self) -> str:
        if not self.enabled:
            return "none (no writable cgroup hierarchy: OOM kills look like SIGKILL)"
        parts = []
        if self.memory_v1:
            parts.append("memory=v1")
        elif "memory" in self.unified_controllers:
            parts.append("memory=v2")
        if self.pids_v1:
            parts.append("pids=v1")
        elif "pids" in self.unified_controllers:
            parts.append("pids=v2")
        if self.cpu_v1:
            parts.append("cpu=v1")
        elif "cpu" in self.unified_controllers:
            parts.append("cpu=v2")
        parts.append("kill=v2 cgroup.kill" if self.has_kill else "kill=sweep")
        return ", ".join(parts)

    def weigh_children_cpu(self, shares: int) -> bool:
        """Give all children together ``shares`` of CPU against the daemon's 1024.

        A task of the daemon's cgroup weighs 1024 (v1 ``cpu.shares``; v2
        ``cpu.weight`` 100), so 256 lets the daemon keep up to four fifths of a
        core while its children are busy, and the children the rest.
        """
        try:
            if self.cpu_v1 is not None:
                _write(self.cpu_v1 / "cpu.shares", str(max(2, shares)))
                return True
            if self.unified is not None and "cpu" in self.unified_controllers:
                weight = max(1, min(10000, shares * 100 // 1024))
                _write(self.unified / "cpu.weight", str(weight))
                return True
        except OSError as exc:
            log.warning("cannot weigh the children's CPU: %s", exc)
        return False

    def reserve_memory(self, reserve: int) -> int | None:
        """Cap all children together at what the daemon may use minus ``reserve``.

        So a process that eats all memory is OOM-killed inside the children's
        cgroup, and the daemon keeps ``reserve`` bytes to go on answering.
        Returns the cap, or None when there is no memory controller.
        """
        if reserve <= 0 or self._memory_base is None:
            return None
        available = _mem_total()
        own = None
        try:
            if self.memory_v1 is not None:
                own = int(_read(self._memory_base / "memory.limit_in_bytes"))
            else:
                raw = _read(self._memory_base / "memory.max").strip()
                own = None if raw == "max" else int(raw)
        except (OSError, ValueError):
            own = None
        if own is not None:
            available = min(available, own)
        cap = max(available - reserve, 16 << 20)
        parent = self.memory_v1 if self.memory_v1 is not None else self.unified
        assert parent is not None
        try:
            if self.memory_v1 is not None:
                _write(parent / "memory.limit_in_bytes", str(cap))
                with contextlib.suppress(OSError):
                    _write(parent / "memory.memsw.limit_in_bytes", str(cap))
            else:
                _write(parent / "memory.max", str(cap))
        except OSError as exc:
            log.warning("cannot cap the children's memory: %s", exc)
            return None
        return cap

    # --- per-process cgroups ---

    def create(
        self, name: str, *, memory_limit: int | None = None, pids_limit: int | None = None
    ) -> ProcessCgroup | None:
        if not self.enabled:
            return None
        cg = ProcessCgroup()
        # The shared children's group is only joined, never made per process:
        # the one parent whose absence nothing below would notice.
        if self.cpu_v1 is not None and not self.cpu_v1.is_dir():
            _remake_parent(self.cpu_v1)
        try:
            if self.memory_v1 is not None:
                d = _mkdir_in(self.memory_v1, name)
                cg.dirs.append(d)
                cg.memory = (d, 1)
            if self.pids_v1 is not None:
                d = _mkdir_in(self.pids_v1, name)
                cg.dirs.append(d)
                cg.pids = (d, 1)
            if self.unified is not None:
                d = _mkdir_in(self.unified, name)
                cg.dirs.append(d)
                cg.unified = d
                if "memory" in self.unified_controllers:
                    cg.memory = (d, 2)
                if "pids" in self.unified_controllers:
                    cg.pids = (d, 2)
            if self.cpu_v1 is not None:
                cg.shared_procs.append(str(self.cpu_v1 / "cgroup.procs"))
            cg.apply_limits(memory_limit, pids_limit)
        except OSError:
            cg.remove()
            raise
        return cg

    def remove_parents(self) -> None:
        for parent in (self.memory_v1, self.pids_v1, self.unified, self.cpu_v1):
            if parent is None:
                continue
            for child in parent.iterdir() if parent.is_dir() else ():
                if child.is_dir():
                    _kill_dir(child)
                    with contextlib.suppress(OSError):
                        child.rmdir()
            with contextlib.suppress(OSError):
                parent.rmdir()


def _mkdir_in(parent: Path, name: str) -> Path:
    """``parent/name``, made; a parent that vanished is made again first.

    Checked on failure rather than before every start: a stat per hierarchy
    per process was 2.5% of the loop's time in the exec round trip profile.
    """
    d = parent / name
    try:
        d.mkdir()
    except FileNotFoundError:
        _remake_parent(parent)
        d.mkdir()
    return d


def _remake_parent(parent: Path) -> None:
    # Someone removed our parent (another tenant's cleanup): make it again.
    log.warning("cgroup %s vanished; re-creating it", parent)
    with contextlib.suppress(OSError):
        parent.mkdir(exist_ok=True)


class ProcessCgroup:
    """The cgroups of one process, in every hierarchy in use."""

    __slots__ = ("dirs", "memory", "pids", "removed", "shared_procs", "unified")

    def __init__(self) -> None:
        self.dirs: list[Path] = []
        self.shared_procs: list[str] = []  # groups joined but not owned (the children's CPU group)
        self.memory: tuple[Path, int] | None = None
        self.pids: tuple[Path, int] | None = None
        self.unified: Path | None = None
        self.removed = False

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs] + self.shared_procs

    def apply_limits(self, memory_limit: int | None, pids_limit: int | None) -> None:
        if memory_limit is not None and self.memory is not None:
            d, version = self.memory
            if version == 1:
                _write(d / "memory.limit_in_bytes", str(memory_limit))
                # Without a swap limit too, a host with swap pages out instead of OOM-killing.
                with contextlib.suppress(OSError):
                    _write(d / "memory.memsw.limit_in_bytes", str(memory_limit))
            else:
                _write(d / "memory.max", str(memory_limit))
                with contextlib.suppress(OSError):
                    _write(d / "memory.swap.max", "0")
        if pids_limit is not None and self.pids is not None:
            d, _version = self.pids
            _write(d / "pids.max", str(pids_limit))

    def oom_kills(self) -> int:
        """How many processes of this cgroup the OOM killer has killed."""
        if self.memory is None:
            return 0
        d, version = self.memory
        try:
            if version == 1:
                return _counter(_read(d / "memory.oom_control"), "oom_kill")
            return _counter(_read(d / "memory.events"), "oom_kill")
        except (OSError, ValueError):
            return 0

    def pids_in(self) -> list[int]:
        for d in self.dirs:
            try:
                return [int(p) for p in _read(d / "cgroup.procs").split()]
            except (OSError, ValueError):
                continue
        return []

    def populated(self) -> bool:
        return bool(self.pids_in())

    def kill(self) -> None:
        """SIGKILL every process in the cgroup, escaped sessions included."""
        if self.removed:
            return
        if self.unified is not None:
            try:
                _write(self.unified / "cgroup.kill", "1")
                return
            except OSError:
                pass  # kernel before 5.14: fall through to the sweep
        for d in self.dirs:
            _kill_dir(d)

    def remove(self) -> bool:
        """Remove the cgroups; False while a process is still inside."""
        if self.removed:
            return True
        ok = True
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
        self.removed = ok
        return ok


def _pidns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _remove_stale_parents(base: Path) -> None:
    """Remove the empty cgroups that a daemon of *our* pid namespace left behind.

    Only tags of our own pid namespace are considered, since only there can we
    tell a dead daemon from a live one. Processes of a dead daemon are left
    alone: a cgroup that still holds one stays (``rmdir`` fails).
    """
    prefix = f"sandboxd-{_pidns()}-"
    try:
        entries = list(base.glob(prefix + "*"))
    except OSError:
        return
    for parent in entries:
        pid = parent.name.removeprefix(prefix).removesuffix("-daemon")
        if not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
            continue
        for child in parent.glob("p*"):
            with contextlib.suppress(OSError):
                child.rmdir()
        with contextlib.suppress(OSError):
            parent.rmdir()
