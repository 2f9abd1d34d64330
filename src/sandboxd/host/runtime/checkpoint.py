"""Processes saved to disk and brought back: memory snapshots and suspend to disk (gVisor).

runsc can save a whole sandbox (the Sentry's memory, every process, their
open files and sockets) into an image, and start a sandbox again from it. It
cannot save one whose sockets are host sockets (hostinet), so this works for
sandboxes on gVisor's own network stack (``gvisor.NETSTACK``, a gVisor host's
default; ``SANDBOXD_HOST_GVISOR_NETWORK=host`` opts out). Two uses:

* **Memory snapshot** (:func:`memory_snapshot`): runsc saves the sandbox, which
  stops it; the writable layer is archived as for a filesystem snapshot (the
  processes are stopped, so it matches the memory image); the sandbox is then
  restored in place from the raw image, and the image is compressed beside the
  archive. A restore (``gvisor.Gvisor.launch`` with a :class:`Seed` carrying a
  ``memory``) fills the layer, unpacks the image, and ``runsc restore``s it.
* **Suspend to disk** (:func:`suspend`, :func:`resume`): runsc saves the
  sandbox into its bundle (root-only, on disk) and its processes end: a
  suspended sandbox holds disk, not memory. Resume restores it in place. Both
  the image and the bundle are on disk, so a restart of the host in between
  loses nothing.
* **A host stopped mid-snapshot** (:func:`revive`): a sandbox runsc had saved
  and stopped is restored from that image at the next start.

runsc 20221219 refuses to save a TCP socket with a waiter (one watched by
epoll) or a connection to outside the sandbox, and a refused save ends the
Sentry. So the host closes its own connections to the daemon first
(client-first, so the daemon's side ends closed, not in TIME_WAIT), the daemon
runs its event loop on poll(2) (``gvisor.BOOT_POLL``), and the sandbox's
sockets are listed before a save (``/api/v1/sockets``): with a socket held by
a process on epoll, or a connection out, none is tried (:func:`unsavable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from .. import states
from ..model import ApiError, Record
from ..proxy import http_proxy as proxy
from ..states import Event
from . import bubblewrap as runtime
from . import gvisor

if TYPE_CHECKING:
    from ..manager import Manager

log = logging.getLogger("sandboxd.host")

IMAGE = "checkpoint.img"
# In a sandbox's bundle: runsc's image while a memory snapshot is taken.
SNAPSHOT_IMAGE = "snapshot-image"
COMPRESSED = IMAGE + ".zst"
META = "meta.json"
# After the host closed its connections to the daemon: time for the daemon's
# side (under ptrace, slow) to see the close and finish it, before runsc saves.
SETTLE_S = 0.5
# How long the host waits for the daemon to close its side of the host's connections.
QUIESCE_S = 5.0
# How long a saved sandbox's processes get to leave its cgroup (they exit at once).
EXIT_WAIT_S = 10.0
# What cgroup v2's memory.reclaim is asked to push out once the processes are gone.
RECLAIM = "1G"

MEMORY_NEEDS_GVISOR = "MEMORY_SNAPSHOT_NEEDS_GVISOR"
# The default runtime's answer to a memory snapshot (400 UNSUPPORTED_SNAPSHOT_TYPE).
BWRAP_REFUSAL = (
    "memory snapshots need the gVisor runtime: start the host with 'sandboxd host "
    f"--runtime gvisor' (on gVisor's own network stack, its default: leave "
    f"{gvisor.NETWORK_ENV} unset or '{gvisor.NETSTACK}'; docs/gvisor.md). "
    "Under the default runtime (bubblewrap) running processes cannot be saved: CRIU, "
    "the only way here, fails its kernel check on this kernel ('criu check': Unexpected "
    "rt vDSO area bounds). Take a filesystem snapshot (the default, or snapshot_type "
    "'filesystem'): restores get the files, and start fresh processes"
)


def refusal(m: Manager, sandbox_id: str | None = None) -> str | None:
    """Why a memory snapshot of ``sandbox_id`` (None: a restore here) cannot work, if not."""
    if m.runtime != "gvisor" and (sandbox_id is None or m.gvisor.address(sandbox_id) is None):
        return BWRAP_REFUSAL
    if sandbox_id is not None and not m.gvisor.checkpointable(sandbox_id):
        return (
            f"sandbox {sandbox_id} runs on the host's network stack (hostinet: "
            f"{gvisor.NETWORK_ENV}={gvisor.HOSTINET}), which runsc cannot save. Memory "
            "snapshots, live copies and suspend to disk need gVisor's own network stack, "
            f"a gVisor host's default: start the host with {gvisor.NETWORK_ENV} unset (or "
            f"{gvisor.NETWORK_ENV}={gvisor.NETSTACK}) and create the sandbox again; a "
            "filesystem snapshot works now"
        )
    if sandbox_id is None and m.gvisor.net != gvisor.NETSTACK:
        return (
            "a memory snapshot restores only on gVisor's own network stack: start the "
            f"host with 'sandboxd host --runtime gvisor' and {gvisor.NETWORK_ENV} unset "
            f"(or {gvisor.NETWORK_ENV}={gvisor.NETSTACK}), not {gvisor.NETWORK_ENV}="
            f"{gvisor.HOSTINET}"
        )
    return None


class Seed:
    """``runtime.launch(seed=…)``: fills the layer; ``memory`` set for a memory snapshot."""

    def __init__(
        self, fill: Callable[[Path], None], memory: gvisor.MemoryImage | None = None
    ) -> None:
        self.fill = fill
        self.memory = memory

    def __call__(self, rw: Path) -> None:
        self.fill(rw)


# -- the image on disk (blocking) -------------------------------------------------


def compress(image_dir: Path, dest: Path, token: str) -> int:
    """``dest`` (a dir, written as ``.name.tmp`` and renamed): the image, zstd, and meta."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    try:
        r = subprocess.run(
            ["zstd", "-q", "-T0", "-3", str(image_dir / IMAGE), "-o", str(tmp / COMPRESSED)],
            capture_output=True,
        )
        if r.returncode != 0:
            raise OSError(f"zstd: {r.stderr.decode(errors='replace').strip()}")
        fd = os.open(tmp / META, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"token": token, "port": gvisor.DAEMON_PORT, "host": gvisor.CONTROL_IP}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sum(p.stat().st_size for p in dest.iterdir())


def unpack(src: Path, image_dir: Path) -> None:
    image_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    r = subprocess.run(
        ["zstd", "-q", "-d", "-f", str(src / COMPRESSED), "-o", str(image_dir / IMAGE)],
        capture_output=True,
    )
    if r.returncode != 0:
        raise OSError(f"zstd: {r.stderr.decode(errors='replace').strip()}")


def token_of(src: Path) -> str:
    return str(json.loads((src / META).read_text())["token"])


def _reclaim(m: Manager, sandbox_id: str) -> None:
    """Push the sandbox cgroup's page cache out: what it holds once suspended is disk.

    Its processes are gone; what is left charged to it is the page cache of
    the image runsc wrote (cgroup v1: ``memory.force_empty``; v2: ``memory.reclaim``).
    """
    if not m.cgroups.usable:
        return
    cgroup = m.cgroups.sandbox(sandbox_id)
    v1 = cgroup.dirs.get("memory")
    with contextlib.suppress(OSError):
        if v1 is not None:
            (v1 / "memory.force_empty").write_text("0")
        elif cgroup.unified is not None:
            (cgroup.unified / "memory.reclaim").write_text(RECLAIM)


# -- bringing a sandbox back --------------------------------------------------------


async def _restore_in_place(m: Manager, sandbox_id: str, image_dir: Path) -> None:
    """runsc restore of the sandbox from ``image_dir``, until its daemon answers."""
    layout = m.layout(sandbox_id)
    cgroup = m.cgroups.sandbox(sandbox_id) if m.cgroups.usable else None
    if cgroup is not None and not all(d.is_dir() for d in cgroup.all_dirs()):
        # Its cgroup went with a host that stopped while it was suspended.
        rec = m.store.by_id(sandbox_id)
        if rec is not None:
            cgroup.create(rec.memory_mb + runtime.DAEMON_RESERVE_MB, rec.cpus, runtime.PIDS_LIMIT)
    await m.sessions.drop(sandbox_id)
    proc = await m.gvisor.restore_in_place(layout, cgroup, image_dir)
    m._procs[sandbox_id] = proc
    m.own(proc.wait())  # reaped whenever it ends
    await m.gvisor.wait_ready(m.sessions.get(sandbox_id), layout, proc, m.startup_timeout_s)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    return host.startswith("127.") or host in ("[0000:0000:0000:0000:0000:0000:0000:0001]",)


def unsavable(sockets: list[dict[str, Any]]) -> list[str]:
    """What runsc 20221219 would refuse to save, from the daemon's ``/api/v1/sockets``.

    A refused save ends the sandbox in this release (its Sentry exits either
    way), so these are looked for first:

    * a TCP socket held by a process that has an epoll instance: runsc
      refuses an endpoint with a waiter ("still has waiters upon save"), and
      which sockets an epoll set watches is not visible, so any epoll counts
      (servers on poll or select, like Python's ``http.server``, are saved,
      listening sockets included);
    * a connection to anywhere but the sandbox's own loopback ("connected
      state"). The host's connections to the daemon are left out: the host
      closes them all before the save (:func:`_stop_talking`), SSH sessions
      and exposed ports in use included (their clients see the connection end).

    Connections inside the sandbox, on poll, are saved.
    """
    out = []
    for s in sockets:
        state = str(s.get("state", ""))
        if state not in ("listen", "established"):
            continue  # closing or closed: nothing runsc refuses (as measured)
        local, remote = str(s.get("local", ":0")), str(s.get("remote", ":0"))
        port = _port(local)
        watched = any(h.get("epoll") for h in s.get("holders") or [])
        if state == "listen":
            if watched:
                out.append(f"a server listening on port {port} (on epoll)")
        elif port == gvisor.DAEMON_PORT:
            continue  # the host's: closed before the save
        elif not _loopback(remote):
            out.append(f"a connection from port {port} to outside the sandbox")
        elif watched:
            out.append(f"a connection on port {port} watched by epoll")
    return out


async def _sockets(m: Manager, sandbox_id: str) -> list[dict[str, Any]]:
    """The daemon's ``/api/v1/sockets`` listing; :class:`gvisor.CheckpointError` if it has none."""
    try:
        async with m.sessions.get(sandbox_id).get(
            "http://sandbox/api/v1/sockets", timeout=aiohttp.ClientTimeout(total=30)
        ) as r:
            if r.status != 200:
                raise gvisor.CheckpointError(
                    f"the sandbox's daemon did not list its sockets ({r.status}): a save "
                    "that runsc might refuse would end the sandbox, so none was tried"
                )
            listing = (await proxy.daemon_json(r))["sockets"]
        if not isinstance(listing, list) or not all(isinstance(x, dict) for x in listing):
            raise ValueError("not a list of sockets")
        for x in listing:
            _port(str(x.get("local", ":0")))
        return listing
    except (TimeoutError, aiohttp.ClientError, OSError, LookupError, TypeError, ValueError) as exc:
        # A daemon that answers nonsense (its sandbox's root may have replaced
        # it) gets no save: never an error that leaves the sandbox half-way.
        raise gvisor.CheckpointError(
            f"the sandbox's daemon did not list its sockets ({exc}); none was tried"
        ) from exc


async def _check_savable(m: Manager, sandbox_id: str) -> None:
    """Raise :class:`gvisor.CheckpointError` (the sandbox untouched) if runsc would refuse."""
    listing = await _sockets(m, sandbox_id)
    try:
        found = unsavable(listing)
    except (LookupError, TypeError, ValueError, AttributeError) as exc:
        raise gvisor.CheckpointError(f"the sandbox's socket list is malformed ({exc})") from exc
    if found:
        raise gvisor.CheckpointError(
            "runsc (gVisor 20221219) cannot save this sandbox's processes while it has "
            + ", ".join(sorted(set(found)))
            + "; a failed save would end the sandbox, so none was tried: stop it, "
            "or take a filesystem snapshot"
        )


async def _stop_talking(m: Manager, sandbox_id: str) -> None:
    """Close the host's connections to the daemon (client-first) and see them end.

    A connection runsc finds open at the save ends the sandbox, and the
    daemon's side of a long-lived one (a terminal, a tunnel, a follow) can
    take longer than a moment to close under load. So: close, then look
    (a fresh request lists the sandbox's sockets), and close again until the
    only connection to the daemon left is the looking one, or give up with
    :class:`gvisor.CheckpointError` (nothing saved, the sandbox untouched).
    The last look's own connection is then seen closed from inside the
    sandbox, without a connection (:meth:`gvisor.Gvisor.tcp_table`).
    """
    deadline = time.monotonic() + QUIESCE_S
    while True:
        await m.sessions.drop(sandbox_id)
        await asyncio.sleep(SETTLE_S)
        listing = await _sockets(m, sandbox_id)
        open_ = [
            s
            for s in listing
            if str(s.get("state")) not in ("listen", "time_wait", "close")
            and _port(str(s.get("local", ":0"))) == gvisor.DAEMON_PORT
        ]
        if len(open_) <= 1:  # the listing's own
            break
        if time.monotonic() > deadline:
            raise gvisor.CheckpointError(
                f"{len(open_) - 1} connection(s) of the host to the sandbox's daemon did not "
                f"close within {QUIESCE_S:g} s (a terminal, tunnel or SSH session in use); "
                "nothing was saved: try again"
            )
    await m.sessions.drop(sandbox_id)
    await asyncio.sleep(SETTLE_S)
    # The listing's own connection, seen closed from inside (runsc exec, no TCP).
    deadline = max(deadline, time.monotonic() + 2.0)
    while True:
        table = await m.gvisor.tcp_table(sandbox_id)
        if table is None or not _daemon_connections(table):
            return
        if time.monotonic() > deadline:
            raise gvisor.CheckpointError(
                f"a connection of the host to the sandbox's daemon did not close within "
                f"{QUIESCE_S:g} s; nothing was saved: try again"
            )
        await asyncio.sleep(0.1)


def _daemon_connections(proc_net_tcp: str) -> int:
    """Sockets of the daemon's port in ``/proc/net/tcp`` neither listening nor closed."""
    from ...api.sockets import parse_proc_net_tcp

    return sum(
        1
        for s in parse_proc_net_tcp(proc_net_tcp, "tcp")
        if s.state not in ("listen", "time_wait", "close")
        and _port(s.local) == gvisor.DAEMON_PORT
    )


# -- memory snapshot -----------------------------------------------------------------


async def memory_snapshot(
    m: Manager,
    sandbox_id: str,
    prior: str,
    mem_dest: Path,
    archive: Callable[[], int],
) -> int:
    """Save the sandbox's processes into ``mem_dest``, ``archive`` its layer; the size.

    A running sandbox is restored in place afterwards (it reads ``running``
    again once its daemon answers); a sandbox suspended to disk already has
    its image, which is copied. Raises :class:`gvisor.CheckpointError` when
    runsc refused (the sandbox still runs, or is failed if it did not survive).
    """
    bundle = m.gvisor.bundle(sandbox_id)
    addr = m.gvisor.address(sandbox_id)
    if addr is None:
        raise gvisor.CheckpointError(f"sandbox {sandbox_id} is not a gVisor sandbox")
    if prior != states.Status.RUNNING:
        suspended = bundle / gvisor.SUSPENDED_IMAGE
        if not (suspended / IMAGE).exists():
            raise gvisor.CheckpointError(f"sandbox {sandbox_id} has no checkpoint on disk")
        size = await asyncio.to_thread(archive)
        return size + await asyncio.to_thread(compress, suspended, mem_dest, addr.token)
    raw = bundle / SNAPSHOT_IMAGE
    shutil.rmtree(raw, ignore_errors=True)
    await _check_savable(m, sandbox_id)
    await _stop_talking(m, sandbox_id)
    try:
        try:
            await m.gvisor.checkpoint(sandbox_id, raw)
        except (TimeoutError, gvisor.CheckpointError) as exc:
            await _back_or_lost(m, sandbox_id, raw, exc)
            raise gvisor.CheckpointError(str(exc)) from exc
        # Its processes are stopped: the layer matches the image.
        await _exited(m, sandbox_id)
        try:
            size = await asyncio.to_thread(archive)
        finally:
            await _back_or_lost(m, sandbox_id, raw, None)
        return size + await asyncio.to_thread(compress, raw, mem_dest, addr.token)
    finally:
        shutil.rmtree(raw, ignore_errors=True)


async def _back_or_lost(m: Manager, sandbox_id: str, raw: Path, why: BaseException | None) -> None:
    """After a save: the sandbox running again from ``raw``, or failed if it cannot be."""
    if why is not None and await runtime.healthy(m.sessions.get(sandbox_id)):
        return  # runsc refused before stopping it
    try:
        if not (raw / IMAGE).exists() or (raw / IMAGE).stat().st_size == 0:
            raise gvisor.CheckpointError(f"runsc left no image: {why}")
        await _restore_in_place(m, sandbox_id, raw)
    except (gvisor.CheckpointError, runtime.LaunchError, OSError) as exc:
        log.warning(
            "sandbox %s could not be brought back after its checkpoint: %s", sandbox_id, exc
        )
        await _lose(m, sandbox_id, f"its processes could not be restored: {exc}")


async def _lose(m: Manager, sandbox_id: str, error: str) -> None:
    cur = states.try_advance(
        m.store, sandbox_id, Event.RESTORE_FAILED, now=_now(), reason="restore_failed", error=error
    )
    if cur is not None:
        await m._teardown(sandbox_id)


def _now() -> float:
    return time.time()


async def revive(m: Manager, sandbox_id: str) -> bool:
    """Start-up: a sandbox a memory snapshot stopped when the host went down, back from its image.

    runsc had saved it (the container stopped) but the host stopped before
    the restore in place; whether it comes back is whether the image is whole.
    """
    raw = m.gvisor.bundle(sandbox_id) / SNAPSHOT_IMAGE
    if not m.gvisor.checkpointable(sandbox_id) or not (raw / IMAGE).is_file():
        return False
    if m.cgroups.usable and m.cgroups.sandbox(sandbox_id).pids():
        return False  # something of it still runs: not this case
    try:
        await m.gvisor.forget(sandbox_id)
        await _restore_in_place(m, sandbox_id, raw)
    except (gvisor.CheckpointError, runtime.LaunchError, OSError) as exc:
        log.warning("sandbox %s: no restore from its interrupted snapshot: %s", sandbox_id, exc)
        return False
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    log.info("sandbox %s restored from the snapshot the host stopped in", sandbox_id)
    return True


# -- suspend to disk -----------------------------------------------------------------


def suspended_image(m: Manager, sandbox_id: str) -> Path:
    return m.gvisor.bundle(sandbox_id) / gvisor.SUSPENDED_IMAGE


def on_disk(m: Manager, sandbox_id: str) -> bool:
    """Whether the sandbox is suspended to disk (its checkpoint is complete)."""
    return (suspended_image(m, sandbox_id) / IMAGE).is_file() and not m.cgroups.sandbox(
        sandbox_id
    ).pids()


async def _exited(m: Manager, sandbox_id: str, timeout_s: float = EXIT_WAIT_S) -> None:
    """Until the saved sandbox's Sentry and Gofer are gone from its cgroup.

    ``runsc checkpoint`` returns as the container stops, a moment before its
    processes have exited: its memory is freed, and its files quiet, only then.
    """
    if not m.cgroups.usable:
        return
    cgroup = m.cgroups.sandbox(sandbox_id)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while await asyncio.to_thread(cgroup.pids):
        if asyncio.get_running_loop().time() > deadline:
            log.warning("sandbox %s: processes still in its cgroup after its save", sandbox_id)
            return
        await asyncio.sleep(0.02)


async def suspend(m: Manager, rec: Record) -> Record:
    """Save a running gVisor sandbox to its bundle; its processes end (states: suspending)."""
    sid = rec.id
    image = suspended_image(m, sid)
    shutil.rmtree(image, ignore_errors=True)
    try:
        await _check_savable(m, sid)
        await _stop_talking(m, sid)
    except gvisor.CheckpointError as exc:
        cur = states.try_advance(m.store, sid, Event.CHECKPOINT_FAILED)
        if cur is not None:
            m._arm_timer(cur)
        raise ApiError(409, "SUSPEND_FAILED", f"sandbox {sid}: {exc}") from exc
    try:
        await m.gvisor.checkpoint(sid, image)
    except (TimeoutError, gvisor.CheckpointError) as exc:
        if await runtime.healthy(m.sessions.get(sid)):
            cur = states.try_advance(m.store, sid, Event.CHECKPOINT_FAILED)
            if cur is not None:
                m._arm_timer(cur)
            raise ApiError(409, "SUSPEND_FAILED", f"sandbox {sid}: {exc}") from exc
        await _lose(m, sid, f"runsc could not save it: {exc}")
        raise ApiError(409, "SUSPEND_FAILED", f"sandbox {sid} was lost: {exc}") from exc
    await _exited(m, sid)
    await asyncio.to_thread(_reclaim, m, sid)
    log.info("sandbox %s suspended to disk (%d bytes)", sid, (image / IMAGE).stat().st_size)
    # Refused when terminated meanwhile: its teardown removes the image with its dir.
    return states.try_advance(m.store, sid, Event.CHECKPOINTED) or m.store.by_id(sid) or rec


_resuming: dict[str, asyncio.Future[None]] = {}


async def resume(m: Manager, rec: Record) -> None:
    """Restore a sandbox suspended to disk; the caller then moves it to running.

    Two resumes at once (the proxy's automatic one and an explicit one) share
    one restore.
    """
    sid = rec.id
    running = _resuming.get(sid)
    if running is not None:
        await asyncio.shield(running)
        return
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    _resuming[sid] = fut
    try:
        image = suspended_image(m, sid)
        try:
            if not (image / IMAGE).is_file():
                raise gvisor.CheckpointError("its checkpoint is not on disk")
            await _restore_in_place(m, sid, image)
        except (gvisor.CheckpointError, runtime.LaunchError, OSError) as exc:
            await _lose(m, sid, f"its processes could not be restored: {exc}")
            raise ApiError(409, "RESUME_FAILED", f"sandbox {sid}: {exc}") from exc
        shutil.rmtree(image, ignore_errors=True)
        fut.set_result(None)
    except BaseException as exc:
        fut.set_exception(exc)
        fut.exception()  # retrieved: a second waiter may not exist
        raise
    finally:
        _resuming.pop(sid, None)
