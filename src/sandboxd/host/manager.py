"""The lifecycle: create, suspend/resume, terminate, ``timeout_secs``, recovery.

A reader always sees a status the SDK accepts: ``pending`` while the sandbox
starts, ``running`` once its daemon answered health, ``suspended`` while frozen,
``terminated`` once DELETE or the timeout took it (``failed`` if it never came
up, or its daemon died). Every change of status goes through the table of
``states.py``. Slow work (waiting for the daemon, killing a cgroup) never
holds anything a read needs.

A sandbox that is up is held by its launcher's pidfd (``launcher.py``): the
event loop learns of its end without polling, and one that ended without a
teardown of ours (its daemon died) is failed and released.

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

from . import entrypoint, logs, states, usage
from .images.image_store import UID_OFFSET, ImageStore
from .model import (
    DEFAULT_CPUS,
    DEFAULT_DISK_MB,
    DEFAULT_IMAGE,
    DEFAULT_MEMORY_MB,
    PENDING,
    RUNNING,
    SPARE_TAKEN,
    SUSPENDED,
    SUSPENDING,
    ApiError,
    CreateSpec,
    Record,
    new_id,
)
from .network import sandbox_network as network
from .observe import HostObserver
from .pools import Pools
from .proxy.http_proxy import Sessions
from .runtime import bubblewrap as runtime
from .runtime import checkpoint, disk, gvisor, launcher, warmpath, zygote
from .runtime.cgroup import Hierarchies, host_tag
from .snapshots import Snapshots
from .states import Event
from .store.catalog import Catalog
from .store.records import NameTaken, Store
from .volumes.volume_store import Volumes

log = logging.getLogger("sandboxd.host")
# How long a spare's start waits for the creates in flight to be done.
SPARE_YIELD_S = 2.0
T = TypeVar("T")

STARTUP_TIMEOUT_S = 30.0
SUSPEND_NEEDS_NAME = (
    "only named sandboxes can be suspended: name this one first with update(name=...) "
    '(PATCH {"name": "..."}), then suspend it'
)
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


def refusal(exc: states.IllegalTransition) -> ApiError:
    """A refused status change as the request's answer (409 and its code)."""
    return ApiError(exc.status, exc.code, exc.message)


class Manager:
    def __init__(
        self,
        state_dir: Path,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        warm: int = DEFAULT_WARM,
        images_dir: Path | None = None,
        net: network.Config | None = None,
        sandbox_runtime: str = "bwrap",
        nested_userns: bool = False,
    ) -> None:
        self.state_dir = state_dir
        # The seccomp filter's opt-in for nested user and network namespaces.
        self.nested_userns = nested_userns
        self.startup_timeout_s = startup_timeout_s
        # Spares: sandboxes started ahead of demand (the daemon's start is most
        # of a create's time). Not in the store, so nobody sees them until a
        # create claims one and gives it its limits; a restart removes them.
        self.warm = warm
        self._spares: list[str] = []
        self._filling = 0
        # Creates being started: spares (and pools' warm ones) wait for none to be
        # (up to SPARE_YIELD_S), so a refill does not slow the creates that wait.
        self._creating = 0
        self._no_creates = asyncio.Event()
        self._no_creates.set()
        self._claimed: set[str] = set()
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "sandboxes").mkdir(exist_ok=True)
        # The sandboxes' root (bwrap binds its overlay by path) goes through these;
        # below state_dir, only it and root: no other user of the machine.
        os.chmod(state_dir, 0o711)
        os.chown(state_dir / "sandboxes", 0, UID_OFFSET)
        os.chmod(state_dir / "sandboxes", 0o710)
        self.images = ImageStore(images_dir or state_dir / "images")
        self.store = Store(state_dir / "sandboxes.db")
        self.tag = host_tag(state_dir)
        self.cgroups = Hierarchies.detect(self.tag)
        self.daemon = runtime.DaemonRuntime.detect(self.tag)
        # Forks pre-imported daemons into new sandboxes (zygote.py); bwrap sandboxes only.
        self.zygotes = zygote.Zygotes(
            self.daemon.zygote_argv, on=None if sandbox_runtime == "bwrap" else False
        )
        # Per-sandbox netns, veth and nft policy (network/sandbox_network.py); None: loopback only.
        self.net = network.Network(self.tag, net)
        # disk_mb needs mkfs.ext4 (e2fsprogs); without it the dirs are plain.
        self.disks = shutil.which(disk.MKFS) is not None
        # gvisor.py: new sandboxes under runsc when asked; teardown knows either kind.
        self.runtime = sandbox_runtime
        self.gvisor = gvisor.Gvisor(state_dir, self.tag)
        if sandbox_runtime == "gvisor":
            self.startup_timeout_s = max(startup_timeout_s, gvisor.STARTUP_TIMEOUT_S)
        self.sessions: Sessions = gvisor.Sessions(
            lambda sid: str(self.layout(sid).socket), self.gvisor.address
        )
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        # Per sandbox up: the task that waits on its launcher's pidfd (launcher.py).
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self.last_startup_s: float | None = None
        # Snapshots and pools: their records in catalog.db, their logic in their modules.
        self.catalog = Catalog(state_dir / "catalog.db")
        self.snapshots = Snapshots(self, self.catalog)
        self.pools = Pools(self, self.catalog)
        # Named volumes under state_dir/volumes, mounted live into sandboxes (volumes/volume_store.py).
        self.volumes = Volumes(self)
        # /metrics, /health and the event lines (observe.py).
        self.observe = HostObserver(self)
        # Per-sandbox usage (usage.py): sampled by one task from recover(), in /metrics too.
        self.usage = usage.Usage(self)
        self.observe.registry.register(self.usage)

    def layout(self, sandbox_id: str) -> runtime.Layout:
        return runtime.Layout(self.state_dir, sandbox_id)

    # -- start-up and shutdown ------------------------------------------------

    async def recover(self) -> None:
        await asyncio.to_thread(self.daemon.mount)
        default = self.images.get(DEFAULT_IMAGE)
        if default is not None:
            self.zygotes.warm(default)  # its imports overlap the rest of the start
        # A snapshot cut short: fail its record, thaw its sandbox (status running again).
        self.snapshots.recover()
        await self.net.start()  # finds this host's veths, so a lost sandbox's go too
        live = [r for r in self.store.all() if r.live]
        for rec in live:
            if rec.status in (SUSPENDED, SUSPENDING):
                # Frozen: its daemon cannot answer; it is alive if its cgroup has tasks.
                ok = bool(self.cgroups.sandbox(rec.id).pids())
                # Suspended to disk (gVisor): no tasks, its checkpoint is in its bundle.
                ok = ok or (rec.status == SUSPENDED and checkpoint.on_disk(self, rec.id))
            else:
                ok = rec.status == RUNNING and await runtime.healthy(self.sessions.get(rec.id))
                # gVisor: a memory snapshot the host stopped in; back from runsc's image.
                ok = ok or (rec.status == RUNNING and await checkpoint.revive(self, rec.id))
            if ok and rec.status == SUSPENDING:
                # The host stopped mid-suspend: finish it.
                await asyncio.to_thread(self.cgroups.sandbox(rec.id).freeze, True)
                rec = states.advance(self.store, rec.id, Event.FROZEN)
            if ok:
                try:
                    await self._adopt(rec.id, hold_netns=True)
                except OSError as exc:  # the sandbox runs on; only its watch is missing
                    log.warning("sandbox %s: could not hold its launcher: %s", rec.id, exc)
            if ok and rec.status == SUSPENDED:
                log.info("sandbox %s survived the restart, suspended", rec.id)
            elif ok:
                log.info("sandbox %s survived the restart", rec.id)
                self._arm_timer(rec)
            else:
                log.info("sandbox %s was lost while the host was down; cleaning up", rec.id)
                await self._teardown(rec.id)
                self._end(rec.id, Event.TERMINATE, "lost")
        keep = {r.id for r in self.store.all() if r.live}
        for sid in self.cgroups.leftovers():
            if sid not in keep:
                await asyncio.to_thread(self.cgroups.sandbox(sid).kill_and_remove)
        with contextlib.suppress(OSError):
            for d in (self.state_dir / "sandboxes").iterdir():
                if d.name not in keep:
                    launcher.release_netns(d)
                    runtime.remove_dir(self.layout(d.name))
        # Netns and veths of no live sandbox go; the nft table is rebuilt from the records.
        await self.net.sweep({r.id: r.network for r in self.store.all() if r.live})
        await self.gvisor.sweep(keep)
        self.fill_spares()
        self.usage.start()

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
        self.zygotes.close()
        await asyncio.to_thread(self.daemon.unmount)
        # The base dirs go too, unless a sandbox still running has its cgroup there.
        await asyncio.to_thread(self.cgroups.remove_empty_bases)
        self.store.close()
        self.catalog.close()

    # -- create ---------------------------------------------------------------

    def begin_create(self, namespace: str, spec: CreateSpec) -> Record:
        """Record the sandbox as pending (raises NameTaken); the start runs after."""
        rec = Record.new(namespace, spec, time.time())
        if spec.snapshot_id is not None and not rec.labels:
            rec.labels = self._source_labels(spec.snapshot_id)
        if spec.name is not None and self.store.name_taken(namespace, spec.name):
            raise NameTaken(spec.name)
        if self.images.get(spec.image) is None:
            # issue 17: what the host has, and the command (on its store) that gets it.
            raise ApiError(400, "UNKNOWN_IMAGE", self.images.missing_hint(spec.image))
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
            if (tell := SPARE_TAKEN.get()) is not None:  # a fleet's create: its room, this id
                tell(rec.id)
        self.store.put(rec)
        return rec

    def _source_labels(self, snapshot_id: str) -> dict[str, str]:
        """A restore (and a copy) without labels of its own keeps its source sandbox's."""
        snap = self.snapshots.table.get(snapshot_id)
        source = self.store.by_id(snap.sandbox_id) if snap is not None else None
        return dict(source.labels) if source is not None else {}

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
            log.info("spare sandbox %s ready", sid)

    async def launch_spare(
        self, memory_mb: int, cpus: float, disk_mb: int, image: str = DEFAULT_IMAGE
    ) -> str | None:
        """Start a sandbox nobody has yet (a spare, a pool's warm one); None if it failed.

        It is in no record: a create (or a pool claim) gives it one, and
        ``_claim`` its limits.
        """
        sid = new_id()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_creates.wait(), SPARE_YIELD_S)
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
        gv = self.runtime == "gvisor"
        if gv:
            netns = await self.net.setup(sid, policy)
            proc = await self.gvisor.launch(
                layout, cgroup, sid, img, self.daemon, disk_mb if self.disks else None,
                netns=netns, seed=seed,
            )  # fmt: skip
        else:
            # Set up while the launch makes the disk and overlay (it awaits it before bwrap).
            net_setup = asyncio.ensure_future(self.net.setup(sid, policy))
            try:
                proc = await runtime.launch(
                    layout, cgroup, sid, img, self.daemon, disk_mb if self.disks else None,
                    netns=net_setup, seed=seed, nested_userns=self.nested_userns,
                    zygote=await self.zygotes.get(img),
                )  # fmt: skip
            except BaseException:
                # Settled before the teardown removes what it made.
                await asyncio.gather(net_setup, return_exceptions=True)
                raise
            netns = net_setup.result()
        self._procs[sid] = proc
        # Reap bwrap whenever it ends, so no zombie outlives the sandbox.
        self.own(proc.wait())
        wait_ready = self.gvisor.wait_ready if gv else runtime.wait_ready
        await wait_ready(self.sessions.get(sid), layout, proc, self.startup_timeout_s)
        # Up: from now on its end is noticed, and a loopback-only netns is held.
        await self._adopt(sid, hold_netns=netns is None and not gv, fresh=True)

    async def _adopt(self, sid: str, hold_netns: bool, fresh: bool = False) -> None:
        """Hold the sandbox's launcher by pidfd and watch it (launcher.py); with
        ``hold_netns`` (a loopback-only sandbox), bind its network namespace too.
        ``fresh``: just launched, so a launcher not found means it already ended.
        """
        if not self.cgroups.usable:
            return  # its launcher cannot be told from a reused pid; proc.wait() still reaps
        if self.gvisor.address(sid) is not None:
            return  # under runsc: another process tree, gvisor.py's to watch
        cgroup = self.cgroups.sandbox(sid)
        pidfd = await asyncio.to_thread(launcher.open_launcher, cgroup)
        if pidfd is None:
            if fresh:
                raise runtime.LaunchError(
                    "the sandbox ended as soon as its daemon answered: "
                    f"{runtime.log_tail(self.layout(sid)) or '(no output)'}"
                )
            log.warning("sandbox %s: no launcher found; its end will not be noticed", sid)
            return
        try:
            pid = launcher.pid_of(pidfd)
            if hold_netns and pid is not None and self.netns_path(sid) is None:
                await asyncio.to_thread(launcher.hold_netns, self.layout(sid).dir, pid, pidfd)
        except BaseException:
            os.close(pidfd)
            raise
        old = self._watchers.pop(sid, None)
        if old is not None:
            old.cancel()
        task = self._watchers[sid] = self.own(self._watch(sid, pidfd))
        # Closed when the watch ends, however: also if cancelled before it ever ran.
        task.add_done_callback(lambda _: os.close(pidfd))

    async def _watch(self, sid: str, pidfd: int) -> None:
        await launcher.wait_exit(pidfd)
        if self._watchers.get(sid) is not asyncio.current_task():
            return
        del self._watchers[sid]
        await self._died(sid)

    async def _died(self, sid: str) -> None:
        """Its launcher ended without a teardown of ours: the daemon (or its init) died.

        The record ends ``failed`` with the daemon's last output, and all it
        held is released. A spare or a pool's warm one is replaced.
        """
        rec = self.store.by_id(sid)
        if rec is None:
            spare = sid in self._spares
            if spare:
                self._spares.remove(sid)
            if spare or self.pools.forget(sid):
                log.warning("spare sandbox %s died; replacing it", sid)
                await self._teardown(sid)
                self.fill_spares()
            return
        error = "the sandbox's daemon died" + await self._how_it_ended(sid)
        if self._end(sid, Event.DAEMON_DIED, "daemon_died", error) is None:
            return  # ended by someone else, who tears it down
        if rec.status == PENDING:
            return  # its start, in flight, finds "started" refused and tears down
        log.warning("sandbox %s: its daemon died; releasing its resources", sid)
        await self._teardown(sid)
        if rec.pool_id is not None:
            self.fill_spares()

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
        path = create_path(rec, rec.id in self._claimed)
        self.observe.created(rec, path)
        self._creating += 1
        self._no_creates.clear()
        try:
            claimed = rec.id in self._claimed and await self._claim(rec)
            self._claimed.discard(rec.id)
            cur = self.store.by_id(rec.id)
            if not claimed and cur is not None and cur.status == PENDING:
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
            if rec.file_systems:  # mounted before the entrypoint runs (volumes/volume_store.py)
                await self.volumes.mount_all(rec)
            if not (claimed and rec.pool_id is not None):  # a pool's warm one runs it already
                await entrypoint.run_on(self, rec.id)
        except Exception as exc:
            if isinstance(exc, (runtime.LaunchError, OSError)):
                log.warning("sandbox %s failed to start: %s", rec.id, exc)
            else:
                log.exception("sandbox %s failed to start", rec.id)
            await self._teardown(rec.id)
            # Refused (and so not written) when a DELETE came first.
            self._end(rec.id, Event.START_FAILED, "startup_failed", str(exc) or type(exc).__name__)
            self.observe.create_done(path, "failed", time.monotonic() - t0)
            return
        finally:
            self._creating -= 1
            if self._creating == 0:
                self._no_creates.set()
            self.fill_spares()
        self.last_startup_s = time.monotonic() - t0
        cur = states.try_advance(self.store, rec.id, Event.STARTED)
        self.observe.create_done(
            path, "cancelled" if cur is None else "running", time.monotonic() - t0
        )
        if cur is None:
            # Deleted while starting: the DELETE's teardown may have run before
            # this start made its mounts and processes; tear down what is left.
            await self._teardown(rec.id)
            return
        self._arm_timer(cur)
        log.info("sandbox %s running in %.0f ms", rec.id, self.last_startup_s * 1000)

    # -- terminate ------------------------------------------------------------

    async def terminate(self, sandbox_id: str, reason: str = "user_terminated") -> None:
        rec = self.store.by_id(sandbox_id)
        if rec is None or not states.allowed(rec.status, Event.TERMINATE):
            return  # ended already: DELETE is idempotent (the SDK retries it)
        # Status first: the name is free and reads say terminated at once.
        self._end(sandbox_id, Event.TERMINATE, reason)
        if rec.status == RUNNING:  # its output outlives it (logs.py); a frozen one cannot answer
            await logs.capture(self, sandbox_id)
        await self._teardown(sandbox_id)
        if rec.pool_id is not None:
            self.fill_spares()  # its pool may keep more warm now

    async def _how_it_ended(self, sid: str) -> str:
        """The launcher's exit status (when it is our child) and the daemon's last output."""
        out = ""
        proc = self._procs.get(sid)
        if proc is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                # Exited already: only the reaping is left.
                code = await asyncio.wait_for(asyncio.shield(proc.wait()), 2)
                # bwrap exits 128+N when what it ran was killed by signal N.
                out = f" (exit status {code}" + (
                    f": killed by signal {code - 128})" if code > 128 else ")"
                )
        tail = runtime.log_tail(self.layout(sid))
        return out + (f"; its last output: {tail}" if tail else "; it printed nothing")

    async def _teardown(self, sandbox_id: str) -> None:
        timer = self._timers.pop(sandbox_id, None)
        if timer is not None:
            timer.cancel()
        # First, before any await: the launcher's exit below is ours, not a death.
        watcher = self._watchers.pop(sandbox_id, None)
        if watcher is not None:
            watcher.cancel()
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
        await self.gvisor.teardown(sandbox_id)  # runsc's state, if it ran under gVisor
        # Its netns, veth and nft chain (network/sandbox_network.py, ~30 ms) alongside its files.
        layout = self.layout(sandbox_id)
        await asyncio.to_thread(launcher.release_netns, layout.dir)
        await asyncio.gather(
            self.net.teardown(sandbox_id),
            asyncio.to_thread(runtime.remove_dir, layout),
        )

    def _end(
        self, sandbox_id: str, event: Event, reason: str, error: str | None = None
    ) -> Record | None:
        """Move a sandbox to an ended status; None when another end came first."""
        return states.try_advance(
            self.store, sandbox_id, event, now=time.time(), reason=reason, error=error
        )

    def admit(self, rec: Record, event: Event) -> None:
        """Raise the 409 a request gets when ``event`` is not allowed from ``rec``'s status."""
        if not states.allowed(rec.status, event):
            raise refusal(states.IllegalTransition(rec.id, rec.status, event))

    # -- suspend / resume -----------------------------------------------------

    def _freezable(self, rec: Record) -> bool:
        return self.cgroups.sandbox(rec.id).can_freeze

    async def suspend(self, sandbox_id: str) -> Record:
        """Freeze every process of a named sandbox; memory, files and sockets stay."""
        rec = self.store.snapshot(sandbox_id)
        assert rec is not None
        if rec.name is None and rec.pool_id is None:  # a pool's sandboxes suspend too
            raise ApiError(400, "SUSPEND_NEEDS_NAME", SUSPEND_NEEDS_NAME)
        if states.is_noop(rec.status, Event.SUSPEND):
            return rec
        self.admit(rec, Event.SUSPEND)
        to_disk = self.gvisor.checkpointable(rec.id)  # gVisor: runsc saves it (checkpoint.py)
        if not to_disk and not self._freezable(rec):
            raise ApiError(400, "SUSPEND_UNSUPPORTED", "this host has no cgroup v2 freezer")
        timer = self._timers.pop(rec.id, None)
        if timer is not None:
            timer.cancel()
        # Before the first await: a DELETE, snapshot or second suspend meanwhile
        # sees "suspending", and this one does not write over what they did.
        rec = states.advance(self.store, rec.id, Event.SUSPEND)
        if to_disk:
            return await checkpoint.suspend(self, rec)
        # Pooled connections to a frozen daemon would hang their next user.
        await self.sessions.drop(rec.id)
        try:
            await asyncio.to_thread(self.cgroups.sandbox(rec.id).freeze, True)
        except OSError as exc:
            cur = states.try_advance(self.store, rec.id, Event.FREEZE_FAILED)
            if cur is not None:
                self._arm_timer(cur)
            raise ApiError(409, "SUSPEND_FAILED", f"sandbox {rec.id}: {exc}") from exc
        # Refused when terminated meanwhile: its teardown thaws and kills.
        return (
            states.try_advance(self.store, rec.id, Event.FROZEN) or self.store.by_id(rec.id) or rec
        )

    async def resume(self, sandbox_id: str) -> Record:
        rec = self.store.snapshot(sandbox_id)
        assert rec is not None
        if states.is_noop(rec.status, Event.RESUME):
            return rec
        self.admit(rec, Event.RESUME)
        if self.gvisor.checkpointable(rec.id):
            await checkpoint.resume(self, rec)  # from disk (checkpoint.py)
        else:
            await asyncio.to_thread(self.cgroups.sandbox(rec.id).freeze, False)
        # A new lifetime from now (the old one ran out, or was cut, at suspend),
        # stored, so a restart of the host keeps counting from here.
        cur = states.try_advance(self.store, rec.id, Event.RESUME, now=time.time())
        if cur is None:
            return self.store.by_id(rec.id) or rec  # terminated meanwhile
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
        """Named and pool-claimed sandboxes are suspended when their time is up (as on
        Tensorlake), others terminated (§3.1)."""
        rec = self.store.by_id(sandbox_id)
        if rec is None or rec.status != RUNNING:
            return
        can = self._freezable(rec) or self.gvisor.checkpointable(rec.id)
        if (rec.name or rec.pool_id) and can:
            await self.suspend(sandbox_id)  # to disk under gVisor (checkpoint.py)
        else:
            await self.terminate(sandbox_id, "timeout")

    # -- update ---------------------------------------------------------------

    def update(self, rec: Record, changes: dict[str, object]) -> Record:
        self.admit(rec, Event.UPDATE)
        cur = self.store.snapshot(rec.id)
        assert cur is not None
        for key, value in changes.items():
            setattr(cur, key, value)
        self.store.put(cur)
        return cur

    # -- network (network/sandbox_network.py) ---------------------------------------------------

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
        self.admit(rec, Event.UPDATE)
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
        path = self.net.netns_path(sandbox_id) or self.gvisor.netns_path(sandbox_id)
        if path is None:
            # A loopback-only sandbox: the netns held since its launch (launcher.py),
            # never looked up through a pid that could have been reused.
            held = launcher.netns_path(self.layout(sandbox_id).dir)
            path = str(held) if held.exists() else None
        return path


def create_path(rec: Record, claimed: bool) -> str:
    """How a create gets its sandbox: a pool's warm one, a spare, a restore, or a cold start."""
    if claimed:
        return "pool" if rec.pool_id is not None else "spare"
    return "restore" if rec.snapshot_id else "cold"
