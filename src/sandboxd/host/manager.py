"""The lifecycle: create, suspend/resume, terminate, ``timeout_secs``, recovery.

A reader always sees a status the SDK accepts: ``pending`` while the sandbox
starts, ``running`` once its daemon answered health, ``suspended`` while frozen,
``terminated`` once DELETE or the timeout took it (``failed`` if it never came
up). Slow work (waiting for the daemon, killing a cgroup) never holds anything
a read needs.

Sandboxes outlive the control plane: they are not children that die with it.
At start-up every live record is checked: a daemon that still answers stays
``running``, a frozen cgroup with tasks stays ``suspended``; anything else is
torn down and marked ``terminated`` with reason ``lost``. Cgroups, mounts and
dirs that belong to no live record are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from . import disk, network, runtime, warmpath
from .catalog import Catalog
from .cgroup import Hierarchies, host_tag
from .images import ImageStore
from .model import (
    DEFAULT_CPUS,
    DEFAULT_DISK_MB,
    DEFAULT_IMAGE,
    DEFAULT_MEMORY_MB,
    FAILED,
    PENDING,
    RUNNING,
    SUSPENDED,
    SUSPENDING,
    TERMINATED,
    ApiError,
    CreateSpec,
    Record,
    new_id,
)
from .pools import Pools
from .proxy import Sessions
from .snapshots import Snapshots
from .store import NameTaken, Store

log = logging.getLogger("sandboxd.host")
T = TypeVar("T")

STARTUP_TIMEOUT_S = 30.0
DEFAULT_WARM = 1


def untraversable(path: Path) -> str | None:
    """Why the sandboxes' uid cannot pass through the dirs above ``path``, if it cannot."""
    for d in path.resolve().parents:
        if not d.exists():
            continue  # made by the host, 0755
        mode = os.stat(d).st_mode
        if not mode & 0o001:
            return (
                f"{d} is not searchable by others (mode {mode & 0o777:o}); the sandboxes' "
                "users reach their root filesystems through it. Use another --state-dir "
                "or chmod o+x it."
            )
    return None


class Manager:
    def __init__(
        self,
        state_dir: Path,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        warm: int = DEFAULT_WARM,
        images_dir: Path | None = None,
        net: network.Config | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.startup_timeout_s = startup_timeout_s
        # Spares: sandboxes started ahead of demand (the daemon's start is most
        # of a create's time). Not in the store, so nobody sees them until a
        # create claims one and gives it its limits; a restart removes them.
        self.warm = warm
        self._spares: list[str] = []
        self._filling = 0
        self._claimed: set[str] = set()
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "sandboxes").mkdir(exist_ok=True)
        # The sandboxes' uid reaches its root and socket through these: traverse, not list.
        for d in (state_dir, state_dir / "sandboxes"):
            os.chmod(d, 0o711)
        self.images = ImageStore(images_dir or state_dir / "images")
        self.store = Store(state_dir / "sandboxes.db")
        self.tag = host_tag(state_dir)
        self.cgroups = Hierarchies.detect(self.tag)
        self.daemon = runtime.DaemonRuntime.detect(self.tag)
        # Per-sandbox netns, veth and nft policy (network.py); None: loopback only.
        self.net = network.Network(self.tag, net)
        # disk_mb needs mkfs.ext4 (e2fsprogs); without it the dirs are plain.
        self.disks = shutil.which(disk.MKFS) is not None
        self.sessions = Sessions(lambda sid: str(self.layout(sid).socket))
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self.last_startup_s: float | None = None
        # Snapshots and pools: their records in catalog.db, their logic in their modules.
        self.catalog = Catalog(state_dir / "catalog.db")
        self.snapshots = Snapshots(self, self.catalog)
        self.pools = Pools(self, self.catalog)

    def layout(self, sandbox_id: str) -> runtime.Layout:
        return runtime.Layout(self.state_dir, sandbox_id)

    # -- start-up and shutdown ------------------------------------------------

    async def recover(self) -> None:
        await asyncio.to_thread(self.daemon.mount)
        # A snapshot cut short: fail its record, thaw its sandbox (status running again).
        self.snapshots.recover()
        await self.net.start()  # finds this host's veths, so a lost sandbox's go too
        live = [r for r in self.store.all() if r.live]
        for rec in live:
            if rec.status in (SUSPENDED, SUSPENDING):
                # Frozen: its daemon cannot answer; it is alive if its cgroup has tasks.
                ok = bool(self.cgroups.sandbox(rec.id).pids())
            else:
                ok = rec.status == RUNNING and await runtime.healthy(self.sessions.get(rec.id))
            if ok and rec.status == SUSPENDING:
                # The host stopped mid-suspend: finish it.
                await asyncio.to_thread(self.cgroups.sandbox(rec.id).freeze, True)
                rec.status = SUSPENDED
                self.store.put(rec)
            if ok and rec.status == SUSPENDED:
                log.info("sandbox %s survived the restart, suspended", rec.id)
            elif ok:
                log.info("sandbox %s survived the restart", rec.id)
                self._arm_timer(rec)
            else:
                log.info("sandbox %s was lost while the host was down; cleaning up", rec.id)
                await self._teardown(rec.id)
                self._finish(rec.id, TERMINATED, "lost")
        keep = {r.id for r in self.store.all() if r.live}
        for sid in self.cgroups.leftovers():
            if sid not in keep:
                await asyncio.to_thread(self.cgroups.sandbox(sid).kill_and_remove)
        with contextlib.suppress(OSError):
            for d in (self.state_dir / "sandboxes").iterdir():
                if d.name not in keep:
                    runtime.remove_dir(self.layout(d.name))
        # Netns and veths of no live sandbox go; the nft table is rebuilt from the records.
        await self.net.sweep({r.id: r.network for r in self.store.all() if r.live})
        self.fill_spares()

    async def close(self) -> None:
        """The host stops; the sandboxes keep running (see the module doc), spares do not."""
        for h in self._timers.values():
            h.cancel()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        # Let a spare being made tear itself down (below) before we go.
        await asyncio.gather(*tasks, return_exceptions=True)
        spares, self._spares = self._spares, []
        for sid in spares + self.pools.drain():
            await self._teardown(sid)
        await self.net.close()
        await self.sessions.close()
        await asyncio.to_thread(self.daemon.unmount)
        self.store.close()
        self.catalog.close()

    # -- create ---------------------------------------------------------------

    def begin_create(self, namespace: str, spec: CreateSpec) -> Record:
        """Record the sandbox as pending (raises NameTaken); the start runs after."""
        rec = Record.new(namespace, spec, time.time())
        if spec.name is not None and self.store.name_taken(namespace, spec.name):
            raise NameTaken(spec.name)
        if self.images.get(spec.image) is None:
            have = ", ".join(self.images.names()) or "none built"
            raise ApiError(
                400,
                "UNKNOWN_IMAGE",
                f"no image {spec.image!r} on this host (it has: {have}); "
                "build one with `sandboxd image build`",
            )
        # Spares have the default image and disk; a filesystem does not change on claim.
        # A restore never takes one: a spare's filesystem is already live.
        if (
            self._spares
            and spec.disk_mb == DEFAULT_DISK_MB
            and spec.image == DEFAULT_IMAGE
            and spec.snapshot_id is None
        ):
            rec.id = self._spares.pop(0)
            self._claimed.add(rec.id)
        self.store.put(rec)
        return rec

    # -- spares ---------------------------------------------------------------

    def fill_spares(self) -> None:
        if not self.cgroups.usable:
            return  # without cgroups a spare's limits could not be set on claim
        self.pools.fill()  # pools' warm sandboxes: spares too, one shape per pool
        if self.images.get(DEFAULT_IMAGE) is None:
            return  # nothing to start a spare from
        while len(self._spares) + self._filling < self.warm:
            self._filling += 1
            self.own(self._make_spare())

    async def _make_spare(self) -> None:
        try:
            sid = await self.launch_spare(DEFAULT_MEMORY_MB, DEFAULT_CPUS, DEFAULT_DISK_MB)
        finally:
            self._filling -= 1
        if sid is not None:
            self._spares.append(sid)

    async def launch_spare(
        self, memory_mb: int, cpus: float, disk_mb: int, image: str = DEFAULT_IMAGE
    ) -> str | None:
        """Start a sandbox nobody has yet (a spare, a pool's warm one); None if it failed.

        It is in no record: a create (or a pool claim) gives it one, and
        ``_claim`` its limits.
        """
        sid = new_id()
        try:
            await self._launch(sid, memory_mb, cpus, disk_mb, image)
        except asyncio.CancelledError:
            await self._teardown(sid)  # the host is stopping: leave no spare behind
            raise
        except (runtime.LaunchError, OSError) as exc:
            # Not retried here (a broken host would spin); the next create tries again.
            log.warning("spare sandbox %s failed to start: %s", sid, exc)
            await self._teardown(sid)
            return None
        return sid

    async def _launch(
        self,
        sid: str,
        memory_mb: int,
        cpus: float,
        disk_mb: int,
        image: str = DEFAULT_IMAGE,
        seed: Callable[[Path], None] | None = None,
        policy: dict[str, Any] | None = None,
    ) -> None:
        layout = self.layout(sid)
        img = self.images.get(image)
        if img is None:
            raise runtime.LaunchError(f"image {image!r} is not in the image store")
        cgroup = self.cgroups.sandbox(sid) if self.cgroups.usable else None
        if cgroup is not None:
            cgroup.create(memory_mb + runtime.DAEMON_RESERVE_MB, cpus, runtime.PIDS_LIMIT)
        # Its netns, veth and nft chain with ``policy`` (None: the default, as for a spare).
        netns = await self.net.setup(sid, policy)
        proc = await runtime.launch(
            layout,
            cgroup,
            sid,
            img,
            self.daemon,
            disk_mb if self.disks else None,
            netns=netns,
            seed=seed,
        )
        self._procs[sid] = proc
        # Reap bwrap whenever it ends, so no zombie outlives the sandbox.
        self.own(proc.wait())
        await runtime.wait_ready(self.sessions.get(sid), layout, proc, self.startup_timeout_s)

    async def _claim(self, rec: Record) -> bool:
        """Give a spare the record's limits; False if it died meanwhile."""
        if not await runtime.healthy(self.sessions.get(rec.id)):
            await self._teardown(rec.id)
            return False
        self.cgroups.sandbox(rec.id).resize(
            rec.memory_mb, runtime.DAEMON_RESERVE_MB, rec.cpus, runtime.PIDS_LIMIT
        )
        if rec.network is not None:  # a spare runs the default policy until now
            await self.net.apply(rec.id, rec.network)
        if rec.pool_id is not None:
            # Its first command's cgroup join will not wait out a grace period.
            self.own(warmpath.prime())
        return True

    def own(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``work`` as a task of the host's: kept until done, cancelled by :meth:`close`."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)  # type: ignore[arg-type]
        task.add_done_callback(self._tasks.discard)  # type: ignore[arg-type]
        return task

    def start_in_background(self, rec: Record) -> asyncio.Task[None]:
        # Shielded from the request: a client that hangs up does not leave a
        # half-made sandbox; it either runs or is failed and cleaned up.
        return self.own(self._start(rec))

    async def _start(self, rec: Record) -> None:
        t0 = time.monotonic()
        try:
            claimed = rec.id in self._claimed and await self._claim(rec)
            self._claimed.discard(rec.id)
            if not claimed:
                # A restore: the snapshot fills the rw dir before anything runs.
                seed = self.snapshots.seed(rec.snapshot_id) if rec.snapshot_id else None
                await self._launch(
                    rec.id,
                    rec.memory_mb,
                    rec.cpus,
                    rec.disk_mb,
                    rec.image,
                    seed=seed,
                    policy=(self.store.by_id(rec.id) or rec).network,
                )
        except Exception as exc:
            if isinstance(exc, (runtime.LaunchError, OSError)):
                log.warning("sandbox %s failed to start: %s", rec.id, exc)
            else:
                log.exception("sandbox %s failed to start", rec.id)
            await self._teardown(rec.id)
            cur = self.store.by_id(rec.id)
            if cur is not None and cur.status == PENDING:  # not a DELETE meanwhile
                self._finish(rec.id, FAILED, "startup_failed", str(exc) or type(exc).__name__)
            return
        finally:
            self.fill_spares()
        self.last_startup_s = time.monotonic() - t0
        cur = self.store.snapshot(rec.id)
        if cur is None or cur.status != PENDING:
            # Deleted while starting: the DELETE's teardown may have run before
            # this start made its mounts and processes; tear down what is left.
            await self._teardown(rec.id)
            return
        cur.status = RUNNING
        self.store.put(cur)
        self._arm_timer(cur)
        log.info("sandbox %s running in %.0f ms", rec.id, self.last_startup_s * 1000)

    # -- terminate ------------------------------------------------------------

    async def terminate(self, sandbox_id: str, reason: str = "user_terminated") -> None:
        rec = self.store.by_id(sandbox_id)
        if rec is None or not rec.live:
            return  # DELETE is idempotent (the SDK retries it)
        # Status first: the name is free and reads say terminated at once.
        self._finish(sandbox_id, TERMINATED, reason)
        await self._teardown(sandbox_id)
        if rec.pool_id is not None:
            self.fill_spares()  # its pool may keep more warm now

    async def _teardown(self, sandbox_id: str) -> None:
        timer = self._timers.pop(sandbox_id, None)
        if timer is not None:
            timer.cancel()
        await self.sessions.drop(sandbox_id)
        proc = self._procs.pop(sandbox_id, None)
        if self.cgroups.usable:
            await asyncio.to_thread(self.cgroups.sandbox(sandbox_id).kill_and_remove)
        if proc is not None and proc.returncode is None:
            # No cgroups (or bwrap outside them): its process group is the sandbox.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
        # Its netns, veth and nft chain (network.py, ~30 ms) alongside its files.
        await asyncio.gather(
            self.net.teardown(sandbox_id),
            asyncio.to_thread(runtime.remove_dir, self.layout(sandbox_id)),
        )

    def _finish(self, sandbox_id: str, status: str, reason: str, error: str | None = None) -> None:
        cur = self.store.snapshot(sandbox_id)
        if cur is None:
            return
        cur.status = status
        cur.terminated_at = time.time()
        cur.termination_reason = reason
        cur.error = error
        self.store.put(cur)

    # -- suspend / resume -----------------------------------------------------

    def _freezable(self, rec: Record) -> bool:
        return self.cgroups.sandbox(rec.id).can_freeze

    async def suspend(self, sandbox_id: str) -> Record:
        """Freeze every process of a named sandbox; memory, files and sockets stay."""
        rec = self.store.snapshot(sandbox_id)
        assert rec is not None
        if rec.name is None:
            raise ApiError(400, "SUSPEND_NEEDS_NAME", "only named sandboxes can be suspended")
        if rec.status == SUSPENDED:
            return rec
        if rec.status != RUNNING:
            raise ApiError(409, "NOT_RUNNING", f"sandbox {rec.id} is {rec.status}")
        if not self._freezable(rec):
            raise ApiError(400, "SUSPEND_UNSUPPORTED", "this host has no cgroup v2 freezer")
        timer = self._timers.pop(rec.id, None)
        if timer is not None:
            timer.cancel()
        # Before the first await: a DELETE, snapshot or second suspend meanwhile
        # sees "suspending", and this one does not write over what they did.
        rec.status = SUSPENDING
        self.store.put(rec)
        # Pooled connections to a frozen daemon would hang their next user.
        await self.sessions.drop(rec.id)
        try:
            await asyncio.to_thread(self.cgroups.sandbox(rec.id).freeze, True)
        except OSError as exc:
            cur = self.store.snapshot(sandbox_id)
            if cur is not None and cur.status == SUSPENDING:
                cur.status = RUNNING
                self.store.put(cur)
                self._arm_timer(cur)
            raise ApiError(409, "SUSPEND_FAILED", f"sandbox {rec.id}: {exc}") from exc
        cur = self.store.snapshot(sandbox_id)
        if cur is None or cur.status != SUSPENDING:
            return cur or rec  # terminated meanwhile: its teardown thaws and kills
        cur.status = SUSPENDED
        self.store.put(cur)
        return cur

    async def resume(self, sandbox_id: str) -> Record:
        rec = self.store.snapshot(sandbox_id)
        assert rec is not None
        if rec.status == RUNNING:
            return rec
        if rec.status != SUSPENDED:
            raise ApiError(409, "NOT_SUSPENDED", f"sandbox {rec.id} is {rec.status}")
        await asyncio.to_thread(self.cgroups.sandbox(rec.id).freeze, False)
        cur = self.store.snapshot(sandbox_id)
        if cur is None or cur.status != SUSPENDED:
            return cur or rec  # terminated meanwhile
        # A new lifetime from now (the old one ran out, or was cut, at suspend),
        # stored, so a restart of the host keeps counting from here.
        cur.status, cur.lifetime_from = RUNNING, time.time()
        self.store.put(cur)
        self._arm_timer(cur)
        return cur

    # -- timeout_secs ---------------------------------------------------------

    def _arm_timer(self, rec: Record) -> None:
        deadline = rec.deadline()
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline - time.time())

        def fire() -> None:
            self._timers.pop(rec.id, None)
            self.own(self._expire(rec.id))

        self._timers[rec.id] = loop.call_later(delay, fire)

    async def _expire(self, sandbox_id: str) -> None:
        """Named sandboxes are suspended when their time is up, others terminated (§3.1)."""
        rec = self.store.by_id(sandbox_id)
        if rec is None or rec.status != RUNNING:
            return
        if rec.name is not None and self._freezable(rec):
            await self.suspend(sandbox_id)
        else:
            await self.terminate(sandbox_id, "timeout")

    # -- update ---------------------------------------------------------------

    def update(self, rec: Record, changes: dict[str, object]) -> Record:
        if not rec.live:
            raise ApiError(409, "SANDBOX_TERMINATED", f"sandbox {rec.id} is {rec.status}")
        cur = self.store.snapshot(rec.id)
        assert cur is not None
        for key, value in changes.items():
            setattr(cur, key, value)
        self.store.put(cur)
        return cur

    # -- network (network.py) ---------------------------------------------------

    async def check_network(self, policy: dict[str, Any] | None) -> None:
        """Create: 400 ``UNRESOLVABLE_DESTINATION`` before anything is made."""
        try:
            await network.resolve(policy, strict=True)
        except network.PolicyError as exc:
            raise ApiError(400, exc.code, str(exc)) from exc

    async def set_network(self, rec: Record, policy: dict[str, Any] | None) -> Record:
        """PATCH ``network`` (None: back to the default): in force before the reply.

        One nft transaction swaps the policy atomically; if it fails (a name
        that does not resolve: 400) the previous policy stays.
        """
        if not rec.live:
            raise ApiError(409, "SANDBOX_TERMINATED", f"sandbox {rec.id} is {rec.status}")
        try:
            await self.net.apply(rec.id, policy, strict=True)
        except network.PolicyError as exc:
            raise ApiError(400, exc.code, str(exc)) from exc
        except OSError as exc:
            msg = f"the policy was not changed: {exc}"
            raise ApiError(500, "NETWORK_UPDATE_FAILED", msg) from exc
        cur = self.store.snapshot(rec.id)
        assert cur is not None
        cur.network = policy
        self.store.put(cur)
        return cur

    def netns_path(self, sandbox_id: str) -> str | None:
        """The sandbox's network namespace (exposed ports are reached from inside it)."""
        path = self.net.netns_path(sandbox_id)
        if path is None and self.cgroups.usable:
            # A loopback-only sandbox: its own netns, found through its processes.
            path = network.netns_of_pids(self.cgroups.sandbox(sandbox_id).pids())
        return path
