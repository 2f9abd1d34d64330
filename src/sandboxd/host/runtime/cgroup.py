"""One cgroup set per sandbox: limits for memory, cpu and pids; kill via the v2 core.

Layouts (see ``engine/cgroups.py`` for how they are found): on a hybrid host
(this project's machines) the limits live in the v1 memory, cpu and pids
hierarchies and the controller-less v2 tree at ``/sys/fs/cgroup/unified`` gives
``cgroup.kill``; on a v2-only host everything is in one directory. Every
sandbox gets ``sandboxd-host-<tag>/<id>`` in each hierarchy. The launcher joins them
before it execs bubblewrap (:meth:`SandboxCgroup.join`), so every process of the
sandbox, its daemon included, is counted and killed with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...engine import cgroupfs

PARENT = "sandboxd-host"


def host_tag(state_dir: Path) -> str:
    """A name for one host's things on the machine: cgroups, netns, nft tables.

    Derived from the state dir, so two hosts on one machine (tests run several)
    never take each other's sandboxes for crash leftovers, and a restarted host
    finds its own again.
    """
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return f"{PARENT}-{digest}"


CPU_PERIOD_US = 100_000


@dataclass(slots=True)
class Hierarchies:
    """Where this host's sandboxes' cgroups go: one base dir per hierarchy."""

    v1: dict[str, Path] = field(default_factory=dict)  # memory/cpu/pids -> base
    v2: Path | None = None  # unified base (kill, and limits on a v2-only host)
    v2_controllers: frozenset[str] = frozenset()
    # Mount points, so a sandbox's own cgroup can be bound over them inside it.
    v1_mounts: dict[str, Path] = field(default_factory=dict)
    v2_mount: Path | None = None

    @classmethod
    def detect(cls, parent: str = PARENT) -> Hierarchies:
        """``parent``: this host's dir in each hierarchy (see :func:`host_tag`)."""
        mounts = cgroupfs.find_mounts()
        v1_paths, v2_path = cgroupfs.own_paths()
        h = cls()
        for ctrl, mnt in mounts.v1.items():
            own = cgroupfs.own_dir(mnt, v1_paths.get(ctrl, "/"))
            if own is not None and os.access(own, os.W_OK):
                h.v1[ctrl] = own / parent
                h.v1_mounts[ctrl] = mnt
        if mounts.v2 is not None:
            own = cgroupfs.own_dir(mounts.v2, v2_path or "/")
            if own is not None and os.access(own, os.W_OK):
                h.v2 = own / parent
                h.v2_mount = mounts.v2
                with contextlib.suppress(OSError):
                    ctrls = set(cgroupfs.read(own / "cgroup.controllers").split())
                    wanted = ctrls & {"memory", "cpu", "pids"} - set(h.v1)
                    if wanted:
                        # v2 hands controllers to children only when asked to.
                        h.v2.mkdir(exist_ok=True)
                        with contextlib.suppress(OSError):
                            cgroupfs.write(
                                own / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted)
                            )
                        cgroupfs.write(
                            h.v2 / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted)
                        )
                        h.v2_controllers = frozenset(wanted)
        return h

    def describe(self) -> str:
        parts = [f"v1 {','.join(sorted(self.v1))}"] if self.v1 else []
        if self.v2 is not None:
            ctrls = ",".join(sorted(self.v2_controllers)) or "no controllers"
            parts.append(f"v2 ({ctrls})")
        return " + ".join(parts) or "none"

    @property
    def usable(self) -> bool:
        return bool(self.v1) or self.v2 is not None

    def sandbox(self, sandbox_id: str) -> SandboxCgroup:
        return SandboxCgroup(self, sandbox_id)

    def bases(self) -> list[Path]:
        return [*self.v1.values(), *([self.v2] if self.v2 else [])]

    def remove_empty_bases(self) -> list[Path]:
        """Remove this host's base dir in each hierarchy; returns those kept (not empty).

        Called when the host stops. A sandbox that outlives the host (they do,
        by design) keeps its base: rmdir refuses a cgroup with children.
        """
        kept = []
        for base in self.bases():
            try:
                base.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                kept.append(base)
        return kept

    def leftovers(self) -> list[str]:
        """Sandbox ids that still have a cgroup here (crash recovery)."""
        ids: set[str] = set()
        for base in self.bases():
            with contextlib.suppress(OSError):
                ids.update(p.name for p in base.iterdir() if p.is_dir())
        return sorted(ids)


class SandboxCgroup:
    def __init__(self, h: Hierarchies, sandbox_id: str) -> None:
        self.h = h
        self.id = sandbox_id
        self.dirs: dict[str, Path] = {c: b / sandbox_id for c, b in h.v1.items()}
        self.unified: Path | None = h.v2 / sandbox_id if h.v2 is not None else None

    def all_dirs(self) -> list[Path]:
        return [*self.dirs.values(), *([self.unified] if self.unified else [])]

    def create(self, memory_mb: int, cpus: float, pids: int) -> None:
        for d in self.all_dirs():
            d.mkdir(parents=True, exist_ok=True)
            # The host's base dir can be passed, not listed. Every sandbox's dir
            # is owned by the same uid (delegate); a sandbox that unmounted the
            # bind of its own dir sees the host's tree under /sys, and must not
            # find the others' there (their names are 64 random bits). bwrap,
            # running as the sandbox's uid, passes it to bind the sandbox's own.
            os.chmod(d.parent, 0o711)
        self.set_limits(memory_mb, cpus, pids)

    def set_limits(self, memory_mb: int, cpus: float, pids: int) -> None:
        mem = memory_mb << 20
        quota = max(1000, int(cpus * CPU_PERIOD_US))
        if "memory" in self.dirs:
            _set_memory_v1(self.dirs["memory"], mem)
        if "cpu" in self.dirs:
            cgroupfs.write(self.dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            cgroupfs.write(self.dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
        if "pids" in self.dirs:
            cgroupfs.write(self.dirs["pids"] / "pids.max", str(pids))
        u, ctrls = self.unified, self.h.v2_controllers
        if u is not None:
            if "memory" in ctrls:
                cgroupfs.write(u / "memory.max", str(mem))
                with contextlib.suppress(OSError):
                    cgroupfs.write(u / "memory.swap.max", "0")
            if "cpu" in ctrls:
                cgroupfs.write(u / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            if "pids" in ctrls:
                cgroupfs.write(u / "pids.max", str(pids))

    def resize(self, memory_mb: int, reserve_mb: int, cpus: float, pids: int) -> None:
        """New limits for a running sandbox: the whole and its daemon's children cap.

        The daemon inside capped its processes at its limit minus its reserve
        when it started (``sandboxd-*`` directly under the sandbox's memory
        cgroup); that cap moves too. A limit is lowered child first and raised
        parent first, so the child never exceeds the parent.
        """
        children = [
            d
            for base in (self.dirs.get("memory"), self.unified)
            if base is not None and base.is_dir()
            for d in base.glob("sandboxd-*")
            if not d.name.endswith("-daemon")
        ]

        def cap_children() -> None:
            for d in children:
                with contextlib.suppress(OSError):
                    if (d / "memory.limit_in_bytes").exists():
                        _set_memory_v1(d, memory_mb << 20)
                    elif (d / "memory.max").exists():
                        cgroupfs.write(d / "memory.max", str(memory_mb << 20))

        cap_children()
        self.set_limits(memory_mb + reserve_mb, cpus, pids)
        cap_children()

    def delegate(self, uid: int) -> None:
        """Let the sandbox's root (host ``uid``) make and fill child cgroups.

        Only the dir and its membership files change owner: the limit files
        stay root's, so the sandbox cannot raise its own limits.
        """
        for d in self.all_dirs():
            os.chown(d, uid, uid)
            for name in ("cgroup.procs", "tasks", "cgroup.threads", "cgroup.subtree_control"):
                with contextlib.suppress(FileNotFoundError):
                    os.chown(d / name, uid, uid)

    def binds(self) -> list[tuple[str, str]]:
        """(host dir, path inside): the sandbox's cgroups where its daemon looks for cgroupfs.

        With a cgroup namespace the daemon sees its own cgroup as the root and
        makes one child per process in it, so an OOM kill is attributed to the
        process (``oom_killed``) and never leaves the sandbox's limit.
        """
        out = [(str(d), str(self.h.v1_mounts[c])) for c, d in self.dirs.items()]
        if self.unified is not None and self.h.v2_mount is not None:
            out.append((str(self.unified), str(self.h.v2_mount)))
        # One mount may carry several controllers (cpu,cpuacct): bind it once.
        seen: set[str] = set()
        return [b for b in out if not (b[1] in seen or seen.add(b[1]))]

    def procs_files(self) -> list[str]:
        """For the launcher's pre-exec hook, which must not allocate much."""
        return [str(d / "cgroup.procs") for d in self.all_dirs()]

    def pids(self) -> list[int]:
        seen: set[int] = set()
        for d in self.all_dirs():
            with contextlib.suppress(OSError, ValueError):
                seen.update(int(p) for p in cgroupfs.read(d / "cgroup.procs").split())
        return sorted(seen)

    @property
    def can_freeze(self) -> bool:
        return self.unified is not None and (self.unified / "cgroup.freeze").exists()

    def freeze(self, frozen: bool, timeout_s: float = 2.0) -> bool:
        """v2 ``cgroup.freeze`` (a core file, there even without controllers); wait for it."""
        assert self.unified is not None
        cgroupfs.write(self.unified / "cgroup.freeze", "1" if frozen else "0")
        want = f"frozen {int(frozen)}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if want in cgroupfs.read(self.unified / "cgroup.events").splitlines():
                return True
            time.sleep(0.001)
        return False

    def oom_kills(self) -> int:
        with contextlib.suppress(OSError, ValueError):
            if "memory" in self.dirs:
                text = cgroupfs.read(self.dirs["memory"] / "memory.oom_control")
            elif self.unified is not None:
                text = cgroupfs.read(self.unified / "memory.events")
            else:
                return 0
            for line in text.splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def kill_and_remove(self, timeout_s: float = 5.0) -> bool:
        """SIGKILL every process, wait for them to be gone, remove every dir.

        The sandbox's daemon makes child cgroups (one per process) inside, so
        each tree is killed and removed deepest first.
        """
        if self.unified is not None and self.unified.is_dir():
            with contextlib.suppress(OSError):
                cgroupfs.write(self.unified / "cgroup.kill", "1")
            # A suspended sandbox: SIGKILL reaches frozen tasks, but thawing
            # lets them exit at once and lets the v1 sweep below see them go.
            with contextlib.suppress(OSError):
                cgroupfs.write(self.unified / "cgroup.freeze", "0")
        deadline = time.monotonic() + timeout_s
        ok = True
        for top in self.all_dirs():
            for d in _deepest_first(top):
                cgroupfs.kill_dir(d)
            for d in _deepest_first(top):
                while d.is_dir():
                    try:
                        d.rmdir()
                    except FileNotFoundError:
                        break
                    except OSError:
                        # Busy: killed tasks not yet reaped by the kernel.
                        if time.monotonic() > deadline:
                            ok = False
                            break
                        cgroupfs.kill_dir(d, rounds=1)
                        time.sleep(0.005)
        return ok


def _set_memory_v1(d: Path, limit: int) -> None:
    # memsw must stay >= the limit: raise it first when growing, after when shrinking.
    memsw = d / "memory.memsw.limit_in_bytes"
    has_memsw = memsw.exists()
    if has_memsw:
        with contextlib.suppress(OSError):
            cgroupfs.write(memsw, str(limit))
    cgroupfs.write(d / "memory.limit_in_bytes", str(limit))
    if has_memsw:
        with contextlib.suppress(OSError):
            cgroupfs.write(memsw, str(limit))


def _deepest_first(top: Path) -> list[Path]:
    if not top.is_dir():
        return []
    found = [Path(root) for root, _dirs, _files in os.walk(top)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def join(procs_files: list[str]) -> None:
    """Pre-exec hook: move the calling (child) process into the sandbox's cgroups."""
    pid = str(os.getpid())
    for path in procs_files:
        with open(path, "w") as f:
            f.write(pid)
