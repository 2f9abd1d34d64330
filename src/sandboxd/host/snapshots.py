"""Filesystem snapshots of a sandbox, and restores from them.

A snapshot is the sandbox's writable state: everything under its
``runtime.Layout.rw`` (the mount point of its ``disk_mb`` ext4: the overlay's
``upper`` layer, or the older ``tmp``/``root``/``home`` dirs), except
``lost+found`` and the overlay's ``work`` dir. GNU tar keeps numeric owners,
modes, symlinks, hard links, sparse files, device nodes (overlay whiteouts are
0/0 char devices) and every xattr (``trusted.overlay.*`` included), compressed
with zstd (gzip where the ``zstd`` binary is missing) into
``<state-dir>/snapshots/<id>.tar.zst``, written to a temp file and renamed.

The sandbox is frozen (cgroup v2 freezer) while tar reads it, so the copy is
consistent, and thawed afterwards whatever happened; a suspended sandbox is
already frozen and stays so. Its status reads ``snapshotting`` meanwhile.

Memory snapshots (``snapshot_type: "memory"``) are taken by runsc, for
sandboxes on the gVisor runtime's own network stack (``checkpoint.py``): the
same archive of the layer, plus runsc's image of the sandbox's memory and
processes (zstd) in ``<id>.mem/``. Elsewhere they are refused (400
``UNSUPPORTED_SNAPSHOT_TYPE``, saying what to run instead): CRIU, the only way
to save processes under bubblewrap, fails its kernel check on this machine, and
a filesystem snapshot is never passed off as one.

A restore (``POST …/sandboxes {"snapshot_id"}``) makes a fresh sandbox whose
writable dir is filled from the archive before anything runs in it
(``runtime.launch(seed=…)``); it inherits the snapshot's image and resources
unless the request names them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import states
from .model import RUNNING, SNAPSHOTTING, ApiError, Record, bad, canonical_image
from .runtime import bubblewrap as runtime
from .runtime import checkpoint, gvisor
from .states import Event
from .store.catalog import Catalog

if TYPE_CHECKING:
    from .manager import Manager
    from .runtime.cgroup import SandboxCgroup

log = logging.getLogger("sandboxd.host")

IN_PROGRESS = "in_progress"
COMPLETED = "completed"
FAILED = "failed"
FILESYSTEM = "filesystem"
MEMORY = "memory"
# How long a snapshot POST waits for the archive before answering in_progress
# (the SDK then polls GET /snapshots/{id} every second).
ANSWER_WITHIN_S = 30.0
# How long a request through the proxy waits for a snapshot to thaw the sandbox.
PROXY_WAIT_S = 60.0

MEMORY_REFUSAL = checkpoint.BWRAP_REFUSAL
# What a memory snapshot's info says cannot come back (issue 21, "honest limits").
MEMORY_LIMITS = (
    "restores processes, memory and files; not connections open at the time "
    "(TCP peers see them reset), and only on a host with the same gVisor release"
)
# Top-level entries of the rw dir that are not the sandbox's state.
NOT_STATE = frozenset({"lost+found", "work", runtime.LOG_NAME})


class SnapshotError(Exception):
    pass


class Unrestorable(SnapshotError):
    """The layer holds a path a restore could not make: the snapshot is refused."""

    code = "SNAPSHOT_UNRESTORABLE"


# A restore's tar makes each member by its name relative to the new rw dir; a
# name of PATH_MAX bytes or more fails there ("File name too long"), so the
# snapshot would be taken and never restored.
PATH_MAX = 4096


@dataclass(slots=True)
class Snapshot:
    id: str
    namespace: str
    sandbox_id: str
    status: str
    base_image: str
    cpus: float
    memory_mb: int
    disk_mb: int
    created_at: float
    compression: str  # "zst" or "gz"
    snapshot_type: str = FILESYSTEM
    size_bytes: int | None = None
    error: str | None = None
    completed_at: float | None = None
    duration_ms: float | None = None


def new_snapshot_id() -> str:
    return "snap-" + secrets.token_hex(8)


def info(s: Snapshot) -> dict[str, Any]:
    """SnapshotInfo (docs/self-hosted.md): only ``id``, never also ``snapshot_id``."""
    out: dict[str, Any] = {
        "id": s.id,
        "namespace": s.namespace,
        "sandbox_id": s.sandbox_id,
        "status": s.status,
        "snapshot_type": s.snapshot_type,
        "base_image": s.base_image,
        "resources": {"cpus": s.cpus, "memory_mb": s.memory_mb, "disk_mb": s.disk_mb},
        "rootfs_disk_bytes": s.disk_mb << 20,
        "snapshot_format_version": f"tar+{'zstd' if s.compression == 'zst' else 'gzip'}"
        + ("+runsc-checkpoint" if s.snapshot_type == MEMORY else ""),
        "created_at": s.created_at,
    }
    if s.size_bytes is not None:
        out["size_bytes"] = s.size_bytes
    if s.error is not None:
        out["error"] = s.error
    if s.snapshot_type == MEMORY:
        out["limits"] = MEMORY_LIMITS
    return out


# -- the archive (pure argv builders, then the blocking calls) --------------------


def compression() -> str:
    return "zst" if shutil.which("zstd") else "gz"


def _compress_flag(kind: str) -> str:
    return "--zstd" if kind == "zst" else "--gzip"


def members(rw: Path) -> list[str]:
    """What of the rw dir is the sandbox's state, as ``./name`` (never taken for an option)."""
    return [f"./{n}" for n in sorted(os.listdir(rw)) if n not in NOT_STATE]


def archive_argv(rw: Path, out: Path, kind: str, names: list[str]) -> list[str]:
    argv = [
        "tar",
        "--create",
        f"--file={out}",
        f"--directory={rw}",
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
        "--sparse",
        "--one-file-system",
        _compress_flag(kind),
    ]
    # Nothing to archive still makes a (valid, empty) archive.
    return [*argv, *names] if names else [*argv, "--files-from=/dev/null"]


def extract_argv(archive: Path, rw: Path, kind: str) -> list[str]:
    return [
        "tar",
        "--extract",
        f"--file={archive}",
        f"--directory={rw}",
        "--numeric-owner",
        "--same-owner",
        "--preserve-permissions",
        "--xattrs",
        "--xattrs-include=*",
        _compress_flag(kind),
    ]


def _tar(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True)
    if r.returncode != 0:
        msg = r.stderr.decode(errors="replace").strip()[-1000:]
        raise SnapshotError(f"tar failed (status {r.returncode}): {msg or 'no message'}")


def _inside(member: str) -> str:
    """A member name as the sandbox sees the path (``./upper/root/x`` -> ``/root/x``)."""
    rel = member.removeprefix("./")
    return "/" + rel.removeprefix("upper/") if rel.startswith("upper/") else "/" + rel


def too_long(rw: Path, names: list[str]) -> str | None:
    """The first member name a restore could not make (PATH_MAX), if any.

    Walks by directory descriptor (``os.fwalk``): the host's own path to a
    deep file is longer still, and would fail as the restore does.
    """
    for name in names:
        if len(name.encode()) >= PATH_MAX:
            return name
        top = rw / name
        if top.is_symlink() or not top.is_dir():
            continue
        for dirpath, dirnames, filenames, _fd in os.fwalk(top):
            rel = name + dirpath[len(str(top)) :]
            # Files, links and dirs alike: each is a member named rel/entry.
            for entry in (*dirnames, *filenames):
                member = f"{rel}/{entry}"
                if len(member.encode(errors="surrogateescape")) >= PATH_MAX:
                    return member
    return None


def archive(rw: Path, dest: Path, kind: str) -> int:
    """Archive ``rw`` into ``dest`` atomically (temp file, fsync, rename); returns its size.

    Raises :class:`Unrestorable` (and writes nothing) when a path in it is
    too long for a restore to make.
    """
    names = members(rw)
    deep = too_long(rw, names)
    if deep is not None:
        shown = _inside(deep)
        raise Unrestorable(
            f"the sandbox has a path of {len(shown.encode())} bytes, longer than a restore can "
            f"make (PATH_MAX {PATH_MAX}): {shown[:200]}…; shorten or remove it, then snapshot again"
        )
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        _tar(archive_argv(rw, tmp, kind, names))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest.stat().st_size


def extract(src: Path, rw: Path, kind: str) -> None:
    _tar(extract_argv(src, rw, kind))


def frozen_archive(cgroup: SandboxCgroup | None, rw: Path, dest: Path, kind: str) -> int:
    """Freeze (when ``cgroup``), archive, and thaw even if the archive failed."""
    if cgroup is not None and not cgroup.freeze(True):
        with contextlib.suppress(OSError):
            cgroup.freeze(False)
        raise SnapshotError("the sandbox's processes did not freeze within 2 s")
    try:
        return archive(rw, dest, kind)
    finally:
        if cgroup is not None:
            with contextlib.suppress(OSError):  # a DELETE may have removed the cgroup
                cgroup.freeze(False)


# -- the service ------------------------------------------------------------------


class Snapshots:
    def __init__(self, manager: Manager, catalog: Catalog) -> None:
        self.m = manager
        self.dir = manager.state_dir / "snapshots"
        self.dir.mkdir(exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.table = catalog.table("snapshots", Snapshot)
        self._settled: dict[str, asyncio.Event] = {}  # sandbox id -> set when its snapshot ends
        # Told of every snapshot taken, settled or deleted here (a fleet node's
        # mirror to etcd, fleet/snapshots.py); a lone host has none.
        self.listeners: list[Callable[[Snapshot], None]] = []

    def use_dir(self, shared: Path) -> None:
        """Keep archives in ``shared`` (a fleet's snapshot store), not the state dir."""
        shared.mkdir(parents=True, exist_ok=True)
        os.chmod(shared, 0o700)
        self.dir = shared

    def _changed(self, s: Snapshot) -> None:
        for tell in self.listeners:
            tell(s)

    def path(self, s: Snapshot) -> Path:
        return self.dir / f"{s.id}.tar.{s.compression}"

    def mem_path(self, s: Snapshot) -> Path:
        """A memory snapshot's runsc image (zstd) and the daemon's token."""
        return self.dir / f"{s.id}.mem"

    def memory_refusal(self, rec: Record) -> str | None:
        """Why ``rec`` cannot be snapshotted with its processes, if it cannot."""
        return checkpoint.refusal(self.m, rec.id)

    # -- start-up ---------------------------------------------------------------

    def recover(self) -> None:
        """Before the manager's recovery: settle what a stop in mid-snapshot left.

        An archive that was being written is failed (its temp file removed); a
        sandbox left frozen by it is thawed and reads ``running`` again; one
        that was suspended before the snapshot stays frozen and ``suspended``.
        """
        for s in self.table.all():
            if s.status == IN_PROGRESS:
                s.status, s.error = FAILED, "the host stopped while the archive was being written"
                self.table.put(s)
                self._changed(s)
        with contextlib.suppress(OSError):
            for f in self.dir.iterdir():
                if f.name.startswith(".") and f.name.endswith(".tmp"):
                    shutil.rmtree(f) if f.is_dir() else f.unlink()
        for rec in self.m.store.all():
            if rec.status == SNAPSHOTTING:
                # Back to what it was before: suspended stays frozen; running is thawed below.
                rec = states.advance(self.m.store, rec.id, Event.SNAPSHOT_DONE)
                if rec.status != RUNNING:
                    continue
            if rec.status != RUNNING or not self.m.cgroups.usable:
                continue
            cgroup = self.m.cgroups.sandbox(rec.id)
            with contextlib.suppress(OSError):
                if (
                    cgroup.can_freeze
                    and "frozen 1" in (cgroup.unified / "cgroup.events").read_text()
                ):  # type: ignore[operator]
                    log.info("sandbox %s was left frozen by a snapshot; thawing it", rec.id)
                    cgroup.freeze(False)

    # -- reads ------------------------------------------------------------------

    def get(self, namespace: str, snapshot_id: str) -> Snapshot:
        s = self.table.get(snapshot_id)
        if s is None or s.namespace != namespace:
            raise ApiError(
                404, "SNAPSHOT_NOT_FOUND", f"no snapshot {snapshot_id!r} in namespace {namespace!r}"
            )
        return s

    def list(self, namespace: str, sandbox_id: str | None = None) -> list[Snapshot]:
        out = [
            s
            for s in self.table.all()
            if s.namespace == namespace and (sandbox_id is None or s.sandbox_id == sandbox_id)
        ]
        return sorted(out, key=lambda s: s.created_at)

    # -- take -------------------------------------------------------------------

    @staticmethod
    def parse_type(body: Any, memory_refusal: str | None = MEMORY_REFUSAL) -> str:
        """The body's snapshot_type; ``memory_refusal`` (None: allowed) answers "memory"."""
        if body in ({}, None):
            return FILESYSTEM
        if not isinstance(body, dict) or set(body) - {"snapshot_type"}:
            raise bad("INVALID_BODY", "the body may only carry snapshot_type")
        kind = body.get("snapshot_type") or FILESYSTEM
        if kind == MEMORY and memory_refusal is not None:
            raise bad("UNSUPPORTED_SNAPSHOT_TYPE", memory_refusal)
        if kind == MEMORY:
            return kind
        if kind != FILESYSTEM:
            raise bad("INVALID_SNAPSHOT_TYPE", "snapshot_type must be 'filesystem' or 'memory'")
        return kind

    def take(self, rec: Record, kind: str = FILESYSTEM) -> tuple[Snapshot, asyncio.Task[None]]:
        """Mark the sandbox ``snapshotting`` and start archiving it in the background."""
        cur = self.m.store.snapshot(rec.id)
        assert cur is not None
        self.m.admit(cur, Event.SNAPSHOT)  # 409 SNAPSHOT_IN_PROGRESS, NOT_RUNNING
        if kind == MEMORY:
            why = self.memory_refusal(cur)
            if why is not None:
                raise bad("UNSUPPORTED_SNAPSHOT_TYPE", why)
        snap = Snapshot(
            id=new_snapshot_id(),
            namespace=cur.namespace,
            sandbox_id=cur.id,
            status=IN_PROGRESS,
            base_image=cur.image,
            cpus=cur.cpus,
            memory_mb=cur.memory_mb,
            disk_mb=cur.disk_mb,
            created_at=time.time(),
            compression=compression(),
            snapshot_type=kind,
        )
        self.table.put(snap)
        self._changed(snap)
        prior = cur.status
        states.advance(self.m.store, cur.id, Event.SNAPSHOT)
        self._settled[cur.id] = asyncio.Event()
        task = self.m.own(self._run(snap, cur.id, prior))
        # A refusal nobody waits for any more is not an error of the host's.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return snap, task

    async def _run(self, snap: Snapshot, sandbox_id: str, prior: str) -> None:
        cg = self.m.cgroups
        cgroup = cg.sandbox(sandbox_id) if cg.usable else None
        # A suspended sandbox is frozen already (and stays so).
        freeze = cgroup if prior == RUNNING and cgroup is not None and cgroup.can_freeze else None
        if prior == RUNNING and freeze is None:
            log.warning("sandbox %s cannot be frozen: its snapshot may be torn", sandbox_id)
        t0 = time.monotonic()
        refused: ApiError | None = None
        rw = self.m.layout(sandbox_id).rw
        try:
            if snap.snapshot_type == MEMORY:
                # runsc stops the processes while it saves them: no freeze.
                size = await checkpoint.memory_snapshot(
                    self.m,
                    sandbox_id,
                    prior,
                    self.mem_path(snap),
                    lambda: archive(rw, self.path(snap), snap.compression),
                )
            else:
                size = await asyncio.to_thread(
                    frozen_archive, freeze, rw, self.path(snap), snap.compression
                )
        except asyncio.CancelledError:
            raise  # the host stops: the thread still thaws; the next start fails the record
        except (OSError, SnapshotError, gvisor.CheckpointError) as exc:
            # Nothing half-written stays: neither the archive nor the image.
            with contextlib.suppress(OSError):
                self.path(snap).unlink()
            shutil.rmtree(self.mem_path(snap), ignore_errors=True)
            snap.status, snap.error = FAILED, str(exc)
            log.warning("snapshot %s of %s failed: %s", snap.id, sandbox_id, exc)
            if isinstance(exc, Unrestorable):
                refused = ApiError(409, exc.code, f"snapshot {snap.id} refused: {exc}")
        else:
            snap.status, snap.size_bytes = COMPLETED, size
            snap.completed_at = time.time()
            snap.duration_ms = round((time.monotonic() - t0) * 1000, 1)
            log.info(
                "snapshot %s of %s: %d bytes in %.0f ms",
                snap.id,
                sandbox_id,
                size,
                snap.duration_ms,
            )
        self.table.put(snap)
        self._changed(snap)
        self.m.observe.snapshot_done(snap.snapshot_type, snap.status, time.monotonic() - t0)
        # Refused when a DELETE during the snapshot already made it terminated.
        cur = states.try_advance(self.m.store, sandbox_id, Event.SNAPSHOT_DONE)
        if cur is not None and cur.status == RUNNING and cur.id not in self.m._timers:
            self.m._arm_timer(cur)  # its timeout fired meanwhile: honour it now
        event = self._settled.pop(sandbox_id, None)
        if event is not None:
            event.set()
        if refused is not None:
            # The request that waits on this answers 409 with the code; one that
            # answered already (202) left the SDK polling, which reads the error.
            raise refused

    async def settled(self, sandbox_id: str, timeout_s: float = PROXY_WAIT_S) -> None:
        """Until the sandbox's snapshot (if any) is over."""
        event = self._settled.get(sandbox_id)
        if event is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout_s)

    # -- delete -----------------------------------------------------------------

    def delete(self, namespace: str, snapshot_id: str) -> None:
        s = self.get(namespace, snapshot_id)
        if s.status == IN_PROGRESS:
            raise ApiError(409, "SNAPSHOT_IN_PROGRESS", f"snapshot {s.id} is still being written")
        with contextlib.suppress(FileNotFoundError):
            self.path(s).unlink()
        shutil.rmtree(self.mem_path(s), ignore_errors=True)
        self.table.delete(s.id)
        self._changed(s)

    # -- restore ----------------------------------------------------------------

    def inherit(self, namespace: str, body: Any) -> Any:
        """A create body with ``snapshot_id``: image and resources filled from the snapshot.

        What the request gives wins, per key of ``resources`` (the SDK omits
        ``resources`` entirely when restoring without resource arguments).
        """
        if not isinstance(body, dict) or body.get("snapshot_id") is None:
            return body
        ident = body["snapshot_id"]
        if not isinstance(ident, str) or not ident:
            raise bad("INVALID_SNAPSHOT_ID", "snapshot_id must be a snapshot's id")
        s = self.get(namespace, ident)
        if s.status != COMPLETED:
            raise ApiError(
                409,
                "SNAPSHOT_NOT_READY",
                f"snapshot {s.id} is {s.status}" + (f": {s.error}" if s.error else ""),
            )
        if s.snapshot_type == MEMORY:
            why = checkpoint.refusal(self.m)
            if why is not None:
                raise ApiError(409, checkpoint.MEMORY_NEEDS_GVISOR, f"snapshot {s.id}: {why}")
        out = dict(body)
        image = out.get("image")
        if image is None:
            out["image"] = s.base_image
        elif canonical_image(image) != s.base_image:
            raise bad(
                "SNAPSHOT_IMAGE_MISMATCH",
                f"snapshot {s.id} is a layer over image {s.base_image!r}, not {image!r}; "
                "omit image to restore it",
            )
        res = out.get("resources")
        if res is None:
            res = {}
        if isinstance(res, dict):  # anything else: parse_create says what is wrong
            inherited = {"cpus": s.cpus, "memory_mb": s.memory_mb, "disk_mb": s.disk_mb}
            out["resources"] = {**inherited, **res}
        return out

    def seed(self, snapshot_id: str) -> Callable[[Path], None]:
        """For ``runtime.launch(seed=…)``: fill a new sandbox's rw dir from the snapshot.

        A memory snapshot's seed also unpacks runsc's image beside the rw dir
        (``gvisor.RESTORE_IMAGE``) and carries the daemon's token (``memory``).
        """
        s = self.table.get(snapshot_id)
        memory = None
        if s is not None and s.snapshot_type == MEMORY:
            try:
                memory = gvisor.MemoryImage(checkpoint.token_of(self.mem_path(s)))
            except (OSError, ValueError, KeyError) as exc:
                raise runtime.LaunchError(f"snapshot {snapshot_id} is unreadable: {exc}") from exc

        def fill(rw: Path) -> None:
            s = self.table.get(snapshot_id)
            if s is None or s.status != COMPLETED:
                raise runtime.LaunchError(f"snapshot {snapshot_id} is gone")
            try:
                extract(self.path(s), rw, s.compression)
                if memory is not None:
                    checkpoint.unpack(self.mem_path(s), rw.parent / gvisor.RESTORE_IMAGE)
            except (OSError, SnapshotError) as exc:
                raise runtime.LaunchError(f"restoring snapshot {snapshot_id}: {exc}") from exc

        return checkpoint.Seed(fill, memory)
