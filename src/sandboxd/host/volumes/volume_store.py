"""Volumes: named directories the host keeps, mounted into sandboxes (``file_systems``).

A volume is ``<state dir>/volumes/<namespace>/<name>/data``: a plain
directory on the host's state filesystem, not a disk image. Why a directory:
several sandboxes mount one volume at once, read-write, and a directory
needs nothing to share (an ext4 image would be one filesystem mounted by the
host and bound into each, with a size but also a loop device, an fsck story
and a host mount to keep across restarts). The price: no per-volume quota;
what a volume holds counts against the state filesystem.

Users: every sandbox's user namespace maps its 0..65535 onto the host's
``UID_OFFSET``.. (``images.py``), the same map for every sandbox of the
default runtime, so a file that root in one sandbox writes is root's in any
other, and a user 1000 is the same user 1000 everywhere. The data dir is
owned by that root, mode 1777 (like /tmp), so an image whose default user is
not root can write there too. ``<state dir>/volumes`` is root's alone (0700):
no user of the machine reaches a volume's files, nor runs a setuid file a
sandbox left there.

A volume is mounted into a running sandbox's own mount namespace by a helper
process (:mod:`.volmount`), at create (after the daemon answers, before the
entrypoint starts; a warm spare is used as for any create) and by
attach/detach. The mount is ``nosuid,nodev``, read-only when asked, with its
flags locked by the kernel against root inside. A sandbox's mounts end with
its mount namespace: nothing to undo when it terminates. A volume is in use
while a live sandbox (pending, running, suspended) lists it; deleting it then
is 409 ``VOLUME_IN_USE``.

Snapshots, suspend, restore: the volume is mounted in the sandbox's mount
namespace only, never under the host's view of its root overlay, so a
filesystem snapshot (which archives the overlay's upper dir) holds the empty
mount point and none of the volume's files; a restore mounts nothing unless
its create asks again (``file_systems``). Suspend freezes the processes; the
mount stays. gVisor sandboxes: refused (``FILE_SYSTEMS_UNSUPPORTED_ON_GVISOR``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...edge.errors import ApiError
from ..images.image_store import UID_OFFSET
from ..runtime import launcher
from ..states import Status
from . import volmount, volspec

if TYPE_CHECKING:
    from ..manager import Manager
    from ..model import Record

HELPER_TIMEOUT_S = 30.0
GVISOR_REFUSAL = (
    "volumes are not mounted into gVisor sandboxes on this host: run this sandbox on the "
    "default runtime (sandboxd host --runtime bwrap)"
)
ARTIFACT_STORAGE = (
    "create_file_system, list_file_systems and delete_file_system talk to Tensorlake's "
    "Artifact Storage, which this host does not have. Make a volume on the host instead: "
    "`sandboxd host volumes create NAME` (or POST /v1/namespaces/{ns}/volumes "
    '{"name": NAME}), then mount it with file_systems=[FileSystemMount(file_system_id=NAME, '
    "mount_path='/mnt/NAME')] or attach_file_system(NAME, '/mnt/NAME')"
)


class Volumes:
    """The host's volumes: dirs under ``<state>/volumes``.

    Creates, deletes, attaches and detaches take one lock. A create's mounts
    do not need it: its record, listing them, is stored (so the volumes are in
    use) before they are mounted.
    """

    def __init__(self, manager: Manager) -> None:
        self.m = manager
        self.root = manager.state_dir / "volumes"
        self.root.mkdir(exist_ok=True)
        os.chmod(self.root, 0o700)
        # "In use" and "exists" are decided and acted on with no change between.
        self.lock = asyncio.Lock()

    # -- the volumes ------------------------------------------------------------

    def dir(self, ns: str, name: str) -> Path:
        return self.root / ns / volspec.check_volume_name(name)

    def data(self, ns: str, name: str) -> Path:
        return self.dir(ns, name) / "data"

    def exists(self, ns: str, name: str) -> bool:
        return (self.dir(ns, name) / "volume.json").exists()

    def users(self, ns: str, name: str) -> list[str]:
        """Live sandboxes (pending, running, suspended...) that list the volume."""
        return [
            r.id
            for r in self.m.store.all()
            if r.namespace == ns
            and r.live
            and any(f["file_system_id"] == name for f in (r.file_systems or []))
        ]

    def info(self, ns: str, name: str) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((self.dir(ns, name) / "volume.json").read_text())
        return {
            "id": name,
            "name": name,
            "namespace": ns,
            "status": "ready",
            "created_at": meta.get("created_at"),
            "used_by": self.users(ns, name),
        }

    def list(self, ns: str) -> list[dict[str, Any]]:
        base = self.root / ns
        if not base.is_dir():
            return []
        names = sorted(d.name for d in base.iterdir() if (d / "volume.json").exists())
        return [self.info(ns, n) for n in names]

    def get(self, ns: str, name: str) -> dict[str, Any]:
        if not self.exists(ns, name):
            raise ApiError(404, "VOLUME_NOT_FOUND", f"no volume {name!r} in namespace {ns!r}")
        return self.info(ns, name)

    async def create(self, ns: str, name: str) -> dict[str, Any]:
        async with self.lock:
            if self.exists(ns, name):
                raise ApiError(409, "VOLUME_EXISTS", f"a volume {name!r} exists already")
            d = self.dir(ns, name)
            if d.exists():  # what a failed delete left: never reused as a new volume's data
                await self._bury(d)
            d.mkdir(parents=True)
            data = d / "data"
            data.mkdir()
            os.chown(data, UID_OFFSET, UID_OFFSET)
            os.chmod(data, 0o1777)
            meta = {"name": name, "created_at": time.time()}
            tmp = d / "volume.json.tmp"
            tmp.write_text(json.dumps(meta))
            tmp.replace(d / "volume.json")  # the last step: the volume exists from here
            return self.info(ns, name)

    async def delete(self, ns: str, name: str) -> None:
        async with self.lock:
            if not self.exists(ns, name):
                raise ApiError(404, "VOLUME_NOT_FOUND", f"no volume {name!r} in namespace {ns!r}")
            users = self.users(ns, name)
            if users:
                raise ApiError(
                    409,
                    "VOLUME_IN_USE",
                    f"volume {name!r} is mounted by {', '.join(users)}: detach it "
                    "(detach_file_system) or terminate those sandboxes first",
                )
            d = self.dir(ns, name)
            (d / "volume.json").unlink()  # gone for every reader first
            await self._bury(d)

    async def _bury(self, d: Path) -> None:
        """Move a volume's dir out of its name at once, then remove it.

        A sandbox's root may have bound the volume elsewhere before it was
        detached and go on writing there: those writes land in the renamed dir,
        never in a new volume of the same name.
        """
        grave = d.with_name(f".deleted-{d.name}-{uuid.uuid4().hex[:12]}")
        os.rename(d, grave)
        await asyncio.to_thread(shutil.rmtree, grave, True)

    # -- checks before a sandbox exists ------------------------------------------

    def check_create(self, ns: str, mounts: list[dict[str, Any]]) -> None:
        """Create: 400 for a volume that does not exist, or a runtime without volumes."""
        if mounts and self.m.runtime == "gvisor":
            raise ApiError(400, "FILE_SYSTEMS_UNSUPPORTED_ON_GVISOR", GVISOR_REFUSAL)
        for mnt in mounts:
            self._check_exists(ns, mnt["file_system_id"])

    def _check_exists(self, ns: str, name: str) -> None:
        if not self.exists(ns, name):
            # 400, not 404: the SDK reads a 404 as "no such sandbox".
            raise ApiError(
                400,
                "FILE_SYSTEM_NOT_FOUND",
                f"no volume {name!r} in namespace {ns!r}: make it first with "
                f"`sandboxd host volumes create {name}`",
            )

    # -- mounting ----------------------------------------------------------------

    async def mount_all(self, rec: Record) -> None:
        """At create, once the daemon answers: every mount the record lists."""
        for mnt in rec.file_systems or []:
            await self._attach(rec, mnt)

    async def attach(self, rec: Record, mount: dict[str, Any]) -> Record:
        async with self.lock:
            cur = self._running(rec.id)
            self._check_exists(cur.namespace, mount["file_system_id"])
            volspec.check_free(cur.file_systems or [], mount["mount_path"])
            await self._attach(cur, mount)
            # In use from the moment it is mounted: recorded under the lock.
            cur = self.m.store.snapshot(rec.id) or cur
            cur.file_systems = [*(cur.file_systems or []), mount]
            self.m.store.put(cur)
            return cur

    async def detach(self, rec: Record, mount_path: str) -> Record:
        async with self.lock:
            cur = self._running(rec.id)
            mounts = cur.file_systems or []
            found = [m for m in mounts if m["mount_path"] == mount_path]
            if not found:
                raise ApiError(
                    400,
                    "FILE_SYSTEM_NOT_MOUNTED",
                    f"nothing is mounted at {mount_path} in sandbox {cur.id}; "
                    "list_file_systems() says what is",
                )
            st = os.stat(self.data(cur.namespace, found[0]["file_system_id"]))
            await self._helper(cur.id, ["detach", mount_path, str(st.st_dev), str(st.st_ino)])
            cur = self.m.store.snapshot(rec.id) or cur
            cur.file_systems = [m for m in mounts if m["mount_path"] != mount_path]
            self.m.store.put(cur)
            return cur

    def _running(self, sid: str) -> Record:
        cur = self.m.store.snapshot(sid)
        if cur is None:
            raise ApiError(404, "SANDBOX_NOT_FOUND", f"no sandbox {sid!r}")
        if self.m.gvisor.address(sid) is not None:
            raise ApiError(400, "FILE_SYSTEMS_UNSUPPORTED_ON_GVISOR", GVISOR_REFUSAL)
        if cur.status != Status.RUNNING:
            what = {
                Status.PENDING: "is still starting: wait for running",
                Status.SUSPENDED: "is suspended: resume() it first",
            }.get(Status(cur.status), f"is {cur.status}")
            raise ApiError(409, "SANDBOX_NOT_RUNNING", f"sandbox {sid} {what}")
        return cur

    async def _attach(self, rec: Record, mount: dict[str, Any]) -> None:
        source = self.data(rec.namespace, mount["file_system_id"])
        mode = "ro" if mount.get("read_only") else "rw"
        await self._helper(rec.id, ["attach", str(source), mount["mount_path"], mode])

    async def _helper(self, sid: str, args: list[str]) -> None:
        """Run :mod:`.volmount` with the sandbox's namespaces; its refusal is the answer."""
        fds = await asyncio.to_thread(sandbox_namespaces, self.m, sid)
        try:
            proc = await asyncio.create_subprocess_exec(
                # -I: no PYTHON* variables, no user site; the file runs alone
                # (it imports nothing of sandboxd).
                sys.executable,
                "-I",
                str(Path(volmount.__file__)),
                args[0],
                str(fds[0]),
                str(fds[1]),
                *args[1:],
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=fds,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            )
        finally:
            for fd in fds:
                os.close(fd)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), HELPER_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise ApiError(409, "MOUNT_FAILED", f"mounting in sandbox {sid} timed out") from None
        if proc.returncode != 0:
            line = (err.decode(errors="replace").strip().splitlines() or ["MOUNT_FAILED: ?"])[-1]
            code, _, message = line.partition(": ")
            if not code.isupper() or " " in code:
                code, message = "MOUNT_FAILED", line
            status = 409 if code == "MOUNT_FAILED" else 400
            raise ApiError(status, code, f"sandbox {sid}: {message}")


def sandbox_namespaces(m: Manager, sid: str) -> list[int]:
    """Descriptors of the sandbox's user and mount namespaces, from its init process.

    Found the way the netns is held (``launcher.hold_netns``): the launcher
    by pidfd in the sandbox's cgroup, its child's namespaces opened, and the
    child seen again as the launcher's child while the launcher lives, so the
    pid was not reused in between.
    """
    if not m.cgroups.usable:
        raise ApiError(
            400, "FILE_SYSTEMS_NEED_CGROUPS", "this host has no cgroup v2: volumes need it"
        )
    pidfd = launcher.open_launcher(m.cgroups.sandbox(sid))
    if pidfd is None:
        raise ApiError(409, "SANDBOX_NOT_RUNNING", f"sandbox {sid} has no running init")
    try:
        pid = launcher.pid_of(pidfd)
        for child in launcher.children(pid) if pid else []:
            fds: list[int] = []
            try:
                for kind in ("user", "mnt"):
                    fds.append(os.open(f"/proc/{child}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                for fd in fds:
                    os.close(fd)
                continue
            if launcher.exited(pidfd) or child not in launcher.children(pid or 0):
                for fd in fds:
                    os.close(fd)
                continue
            return fds
    finally:
        os.close(pidfd)
    raise ApiError(409, "SANDBOX_NOT_RUNNING", f"sandbox {sid} has no running init")
