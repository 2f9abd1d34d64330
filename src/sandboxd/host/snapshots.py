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

Memory snapshots are refused: CRIU, the only way to save processes here,
fails its kernel check on this machine (``criu check``: "Unexpected rt vDSO
area bounds"), and a filesystem snapshot is never passed off as one.

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

from . import runtime
from .catalog import Catalog
from .model import RUNNING, SNAPSHOTTING, SUSPENDED, ApiError, Record, bad, canonical_image

if TYPE_CHECKING:
    from .cgroup import SandboxCgroup
    from .manager import Manager

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

MEMORY_REFUSAL = (
    "memory snapshots are impossible on this host: CRIU, the only way to save "
    "running processes here, fails its kernel check on this kernel ('criu check': "
    "Unexpected rt vDSO area bounds), so processes cannot be checkpointed. Take a "
    "filesystem snapshot (the default, or snapshot_type 'filesystem'): restores "
    "get the files, and start fresh processes"
)
# Top-level entries of the rw dir that are not the sandbox's state.
NOT_STATE = frozenset({"lost+found", "work", runtime.LOG_NAME})


class SnapshotError(Exception):
    pass


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
    """SnapshotInfo (``tensorlake-lifecycle.md`` §4.4): only ``id``, never also ``snapshot_id``."""
    out: dict[str, Any] = {
        "id": s.id,
        "namespace": s.namespace,
        "sandbox_id": s.sandbox_id,
        "status": s.status,
        "snapshot_type": s.snapshot_type,
        "base_image": s.base_image,
        "resources": {"cpus": s.cpus, "memory_mb": s.memory_mb, "disk_mb": s.disk_mb},
        "rootfs_disk_bytes": s.disk_mb << 20,
        "snapshot_format_version": f"tar+{'zstd' if s.compression == 'zst' else 'gzip'}",
        "created_at": s.created_at,
    }
    if s.size_bytes is not None:
        out["size_bytes"] = s.size_bytes
    if s.error is not None:
        out["error"] = s.error
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


def archive(rw: Path, dest: Path, kind: str) -> int:
    """Archive ``rw`` into ``dest`` atomically (temp file, fsync, rename); returns its size."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        _tar(archive_argv(rw, tmp, kind, members(rw)))
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

    def path(self, s: Snapshot) -> Path:
        return self.dir / f"{s.id}.tar.{s.compression}"

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
        with contextlib.suppress(OSError):
            for f in self.dir.iterdir():
                if f.name.startswith(".") and f.name.endswith(".tmp"):
                    f.unlink()
        for rec in self.m.store.all():
            if rec.status == SNAPSHOTTING and rec.status_before == SUSPENDED:
                cur = self.m.store.snapshot(rec.id)
                assert cur is not None
                cur.status, cur.status_before = SUSPENDED, None
                self.m.store.put(cur)
                continue
            if rec.status not in (RUNNING, SNAPSHOTTING) or not self.m.cgroups.usable:
                continue
            cgroup = self.m.cgroups.sandbox(rec.id)
            with contextlib.suppress(OSError):
                if (
                    cgroup.can_freeze
                    and "frozen 1" in (cgroup.unified / "cgroup.events").read_text()
                ):  # type: ignore[operator]
                    log.info("sandbox %s was left frozen by a snapshot; thawing it", rec.id)
                    cgroup.freeze(False)
            if rec.status == SNAPSHOTTING:
                cur = self.m.store.snapshot(rec.id)
                assert cur is not None
                cur.status, cur.status_before = RUNNING, None
                self.m.store.put(cur)

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
    def parse_type(body: Any) -> str:
        if body in ({}, None):
            return FILESYSTEM
        if not isinstance(body, dict) or set(body) - {"snapshot_type"}:
            raise bad("INVALID_BODY", "the body may only carry snapshot_type")
        kind = body.get("snapshot_type") or FILESYSTEM
        if kind == MEMORY:
            raise bad("UNSUPPORTED_SNAPSHOT_TYPE", MEMORY_REFUSAL)
        if kind != FILESYSTEM:
            raise bad("INVALID_SNAPSHOT_TYPE", "snapshot_type must be 'filesystem' or 'memory'")
        return kind

    def take(self, rec: Record) -> tuple[Snapshot, asyncio.Task[None]]:
        """Mark the sandbox ``snapshotting`` and start archiving it in the background."""
        cur = self.m.store.snapshot(rec.id)
        assert cur is not None
        if cur.status == SNAPSHOTTING:
            raise ApiError(
                409, "SNAPSHOT_IN_PROGRESS", f"sandbox {rec.id} is already being snapshotted"
            )
        if cur.status not in (RUNNING, SUSPENDED):
            raise ApiError(409, "NOT_RUNNING", f"sandbox {rec.id} is {cur.status}")
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
        )
        self.table.put(snap)
        prior = cur.status
        cur.status, cur.status_before = SNAPSHOTTING, prior
        self.m.store.put(cur)
        self._settled[cur.id] = asyncio.Event()
        return snap, self.m.own(self._run(snap, cur.id, prior))

    async def _run(self, snap: Snapshot, sandbox_id: str, prior: str) -> None:
        cg = self.m.cgroups
        cgroup = cg.sandbox(sandbox_id) if cg.usable else None
        # A suspended sandbox is frozen already (and stays so).
        freeze = cgroup if prior == RUNNING and cgroup is not None and cgroup.can_freeze else None
        if prior == RUNNING and freeze is None:
            log.warning("sandbox %s cannot be frozen: its snapshot may be torn", sandbox_id)
        t0 = time.monotonic()
        try:
            size = await asyncio.to_thread(
                frozen_archive,
                freeze,
                self.m.layout(sandbox_id).rw,
                self.path(snap),
                snap.compression,
            )
        except asyncio.CancelledError:
            raise  # the host stops: the thread still thaws; the next start fails the record
        except (OSError, SnapshotError) as exc:
            snap.status, snap.error = FAILED, str(exc)
            log.warning("snapshot %s of %s failed: %s", snap.id, sandbox_id, exc)
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
        cur = self.m.store.snapshot(sandbox_id)
        # A DELETE during the snapshot already made it terminated: leave that alone.
        if cur is not None and cur.status == SNAPSHOTTING:
            cur.status, cur.status_before = prior, None
            self.m.store.put(cur)
            if prior == RUNNING and cur.id not in self.m._timers:
                self.m._arm_timer(cur)  # its timeout fired meanwhile: honour it now
        event = self._settled.pop(sandbox_id, None)
        if event is not None:
            event.set()

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
        self.table.delete(s.id)

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
        """For ``runtime.launch(seed=…)``: fill a new sandbox's rw dir from the snapshot."""

        def fill(rw: Path) -> None:
            s = self.table.get(snapshot_id)
            if s is None or s.status != COMPLETED:
                raise runtime.LaunchError(f"snapshot {snapshot_id} is gone")
            try:
                extract(self.path(s), rw, s.compression)
            except (OSError, SnapshotError) as exc:
                raise runtime.LaunchError(f"restoring snapshot {snapshot_id}: {exc}") from exc

        return fill
