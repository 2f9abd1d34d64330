"""Start a sandbox: bubblewrap around its own ``sandboxd serve`` on a unix socket.

What a sandbox is, from the inside out:

- **Root filesystem**: an overlay whose lower dir is an image of the store
  (``images.py``, shared read-only by every sandbox) and whose upper dir is the
  sandbox's own writable layer, ``<sandbox dir>/rw/upper``. ``rw`` is the
  mount point of the sandbox's ``disk_mb`` ext4 (``disk.py``), so the layer is
  what ``disk_mb`` limits and what a snapshot archives.
- **Users**: a user namespace that maps the sandbox's 0..65535 onto host
  ``UID_OFFSET``..+65535. The image's files are owned by that range, so root
  inside owns them (through the overlay it changes copies, never the image),
  and holds no right over anything the host owns. The namespace is made by the
  host, which writes the full map (``bwrap --unshare-user`` run by root could
  only map 0 to 0), and joined with ``nsenter`` before bwrap runs.
- **Namespaces**: pid, mount, ipc, uts (hostname = the sandbox id), cgroup, and
  net: a prepared one (``network.py``: veth and policy) or a new one with
  loopback only.
- **System calls**: a seccomp allow list (``seccomp.py``) for every process; no
  nested user or network namespaces unless the host allows them.
- **The daemon** is the host's interpreter and installed package, bound
  read-only under ``/run/sandboxd-rt`` (:class:`DaemonRuntime`), started
  through the image's dynamic loader with the host interpreter's own library
  dir, so images need not contain sandboxd, nor even Python, only a
  compatible glibc. Nothing of this leaks into the environment of the
  processes it starts.

The host talks to the daemon over ``<sandbox dir>/d.sock``, a unix socket the
host binds and listens on itself (in a dir only root can enter) and hands to
the daemon as an inherited descriptor (``serve --listen-fd``). The sandbox never
sees the socket's path, so nothing inside can replace it, and no user of the
machine but root can connect to it, whatever uid it manages to become.

What the sandbox gets from the host is only what is listed above: the launch
runs with a fixed, minimal environment (``LAUNCH_ENV``), not the host's, so
neither the sandbox's PID 1 (bwrap) nor the daemon can read the operator's
variables; every path it can write is its own ``disk_mb`` disk or a tmpfs of a
fixed size charged to its memory cgroup; its user namespace is owned by a uid
of its own (:func:`owner_uid`), so the kernel's per-user counters (inotify
instances, namespaces) charge that uid, not the host's root.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp

from ... import zygote_child
from ...edge.connections import STARTED_WITH_NOFILE
from ..images.image_store import UID_COUNT, Image
from . import cgroup as cg
from . import disk, mounts, seccomp
from .zygote import Zygote

_log = logging.getLogger("sandboxd.host.runtime")
T = TypeVar("T")

SOCKET_NAME = "d.sock"
INNER_RT = "/run/sandboxd-rt"
# Sizes of the sandbox's tmpfs mounts (memory, charged to its cgroup too).
RUN_TMPFS_BYTES = 64 << 20
SHM_TMPFS_BYTES = 64 << 20
# Owners of the sandboxes' user namespaces: one uid per sandbox, far above any
# real user and the sandboxes' own range (UID_OFFSET..+65535). The kernel
# charges a user namespace's inotify instances, namespaces and the like to its
# owner in the parent namespace, so each sandbox spends only its own budget.
OWNER_BASE = 0x6000_0000
OWNER_SLOTS = 1 << 24
PIDS_LIMIT = 1024
# The sandbox's daemon keeps this much for itself (its --memory-reserve), on top
# of memory_mb: processes get exactly memory_mb, and an OOM kills one of them,
# not the daemon.
DAEMON_RESERVE_MB = 64
# sockaddr_un.sun_path is 108 bytes with its NUL.
MAX_SOCKET_PATH = 107
LOG_TAIL = 2000
LAUNCH_THREADS = 16
LOG_NAME = "daemon.log"
MS_NOSUID = 2  # linux/mount.h
MS_NODEV = 4
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The launcher's whole environment: nothing of the operator's reaches a sandbox
# (bwrap, the sandbox's PID 1, keeps the environment it was started with).
LAUNCH_ENV = {"PATH": PATH, "LANG": "C.UTF-8"}

BWRAP = "bwrap"
# The dynamic loader at the same path in the host and in a glibc image.
LOADERS = {"x86_64": "/lib64/ld-linux-x86-64.so.2", "aarch64": "/lib/ld-linux-aarch64.so.1"}


class LaunchError(Exception):
    """The sandbox did not come up; the message says why (daemon log tail included)."""


def bwrap_available() -> str | None:
    """None if sandboxes can be made here, else the reason they cannot."""
    for tool, pkg in ((BWRAP, "bubblewrap"), ("nsenter", "util-linux"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: apt-get install -y {pkg}"
    if os.geteuid() != 0:
        return "sandboxd host must run as root (cgroups, namespaces, mounts)"
    if platform.machine() not in LOADERS:
        return f"no known dynamic loader path for {platform.machine()}"
    return None


@dataclass(frozen=True, slots=True)
class Layout:
    """Where one sandbox's host-side files are."""

    state_dir: Path
    sandbox_id: str

    @property
    def dir(self) -> Path:
        return self.state_dir / "sandboxes" / self.sandbox_id

    @property
    def socket(self) -> Path:
        """The daemon's socket: bound by the host, reached only by root."""
        return self.dir / SOCKET_NAME

    @property
    def log(self) -> Path:
        """bwrap's and the daemon's output, on the sandbox's own disk (never snapshotted)."""
        return self.rw / LOG_NAME

    @property
    def rw(self) -> Path:
        """The sandbox's writable state: the mount point of its disk_mb filesystem."""
        return self.dir / "rw"

    @property
    def upper(self) -> Path:
        return self.rw / "upper"

    @property
    def work(self) -> Path:
        return self.rw / "work"

    @property
    def root(self) -> Path:
        """The overlay: what the sandbox sees as /."""
        return self.dir / "root"

    @property
    def disk_image(self) -> Path:
        return self.dir / "disk.img"


# -- the daemon, from the host into every sandbox ------------------------------


@dataclass(slots=True)
class DaemonRuntime:
    """The host's interpreter and sandboxd, bound read-only into every sandbox.

    The host's paths may sit where the sandbox's uid cannot go (pyenv under a
    0700 /root), so each is bound once, read-only, under ``/run/<tag>/rt/<n>``
    by the host (as root), and from there into each sandbox.
    """

    tag: str
    sources: dict[str, str] = field(default_factory=dict)  # name -> host path
    python: str = ""  # the interpreter, relative to the "py" source
    machine: str = field(default_factory=platform.machine)

    @classmethod
    def detect(cls, tag: str) -> DaemonRuntime:
        import sandboxd

        base = os.path.realpath(sys.base_prefix)
        exe = os.path.realpath(sys.executable)
        if not exe.startswith(base + "/"):
            exe = os.path.join(base, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
        sources = {"py": base}
        paths = sysconfig.get_paths()
        extra = [
            os.path.realpath(paths["purelib"]),
            os.path.realpath(paths["platlib"]),
            os.path.realpath(os.path.dirname(os.path.dirname(sandboxd.__file__))),
        ]
        for p in extra:
            if p != base and not p.startswith(base + "/") and p not in sources.values():
                sources[f"p{len(sources) - 1}"] = p
        return cls(tag=tag, sources=sources, python=os.path.relpath(exe, base))

    @property
    def host_dir(self) -> Path:
        return Path("/run") / self.tag / "rt"

    def unmount(self) -> None:
        """Remove the binds when the host stops.

        Sandboxes still running keep theirs: bwrap bound each into the
        sandbox's own mount namespace, a mount of its own. The next start of
        the host makes them again.
        """
        mounted = mounts.points()
        for name in self.sources:
            dst = self.host_dir / name
            # Stacked binds (an older host's bug) come off one per umount.
            for _ in range(mounted.count(str(dst))):
                subprocess.run(["umount", "-l", str(dst)], capture_output=True, timeout=30)
            with contextlib.suppress(OSError):
                dst.rmdir()
        for d in (self.host_dir, self.host_dir.parent):
            with contextlib.suppress(OSError):
                d.rmdir()

    def mount(self) -> None:
        """Make the read-only binds under /run/<tag>/rt (idempotent)."""
        mounted = mounts.points()
        for name, src in self.sources.items():
            dst = self.host_dir / name
            dst.mkdir(parents=True, exist_ok=True)
            # Not os.path.ismount: a bind from the same filesystem looks like a dir to it.
            if str(dst) in mounted:
                continue
            _run(["mount", "--bind", src, str(dst)])
            _run(["mount", "-o", "remount,bind,ro", str(dst)])
        os.chmod(self.host_dir.parent, 0o755)

    def binds(self) -> list[tuple[str, str]]:
        return [(str(self.host_dir / n), f"{INNER_RT}/{n}") for n in self.sources]

    def _site(self) -> list[str]:
        return [f"{INNER_RT}/{n}" for n in self.sources if n != "py"]

    def _interpreter(self, boot: str) -> list[str]:
        return [
            LOADERS[self.machine],
            # The host interpreter's RUNPATH (its libpython) is a host path:
            # give the loader the bound copy; no LD_LIBRARY_PATH to leak.
            "--library-path",
            f"{INNER_RT}/py/lib",
            f"{INNER_RT}/py/{self.python}",
            # -I: no PYTHON* variables, no user site, no cwd on sys.path.
            "-I",
            "-c",
            boot,
        ]

    def serve_args(
        self, listen_fd: int, cgroups: bool = True, user: str | None = None
    ) -> list[str]:
        """``sandboxd serve``'s arguments, for exec (:meth:`argv`) and for the zygote alike."""
        args = [
            "serve",
            "--listen-fd",
            str(listen_fd),
            "--memory-reserve",
            f"{DAEMON_RESERVE_MB}M",
            "--log-level",
            "warning",
        ]
        # issue 17: the image's User is the default of processes that name none.
        if user:
            args += ["--default-user", user]
        # Without the sandbox's cgroups bound in, cgroupfs is read-only inside.
        return args if cgroups else [*args, "--no-cgroups"]

    def argv(self, listen_fd: int, cgroups: bool = True, user: str | None = None) -> list[str]:
        boot = (
            f"import sys; sys.path[:0] = {self._site()!r}; "
            "from sandboxd.cli import main; raise SystemExit(main())"
        )
        return [*self._interpreter(boot), *self.serve_args(listen_fd, cgroups, user)]

    def waiter_argv(self, exit_fd: int) -> list[str]:
        """The command bwrap runs once a zygote-forked daemon ended (``zygote_launch.py``).

        It exits with the daemon's status, which the zygote (its reaper) writes
        on ``exit_fd``, so the launcher exits as it would around an exec'd daemon.
        Started only then: its start-up costs nothing to a create.
        """
        boot = (
            "import os, sys\n"
            "data = b''\n"
            "while chunk := os.read(int(sys.argv[1]), 64):\n"
            "    data += chunk\n"
            "os._exit(int(data.split()[0]) if data.split() and data.split()[0].isdigit() else 1)\n"
        )
        return [*self._interpreter(boot)[:-3], "-I", "-S", "-c", boot, str(exit_fd)]

    def zygote_argv(self, image: Image) -> list[str]:
        """The zygote's command line (``host/runtime/zygote.py``; ``{FD}``: its socket to the host).

        bubblewrap as the host's root, without a user or pid namespace of its
        own (joining a sandbox's needs both the host's); a mount namespace whose
        root is the image's, read-only, with this runtime where a sandbox has it.
        """
        boot = (
            f"import sys; sys.path[:0] = {self._site()!r}; "
            "from sandboxd.zygote_child import run; raise SystemExit(run({FD}))"
        )
        argv = [
            BWRAP,
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-net",
            "--die-with-parent",
            "--new-session",
            "--ro-bind",
            str(image.rootfs),
            "/",
            "--dev",
            "/dev",
            "--size",
            str(RUN_TMPFS_BYTES),
            "--tmpfs",
            "/run",
        ]
        for src, dst in self.binds():
            argv += ["--ro-bind", src, dst]
        argv += [
            "--chdir",
            "/",
            "--clearenv",
            "--setenv",
            "PATH",
            PATH,
            "--setenv",
            "LANG",
            "C.UTF-8",
        ]
        return [*argv, "--", *self._interpreter(boot)]


def bwrap_argv(
    layout: Layout,
    hostname: str,
    inner: list[str],
    *,
    userns: str,
    ro_binds: list[tuple[str, str]] | None = None,
    cgroup_binds: list[tuple[str, str]] | None = None,
    netns: str | None = None,
    seccomp_fd: int | None = None,
    cwd: str = "/root",
    image_env: list[tuple[str, str]] | None = None,
    block_fd: int | None = None,
    info_fd: int | None = None,
) -> list[str]:
    """The command line for one sandbox (pure: tested without running it).

    ``block_fd``/``info_fd`` (the zygote's path): bwrap sets the sandbox up,
    reports its init's pid and namespaces on ``info_fd``, and waits until
    ``block_fd`` reads end-of-file (its daemon, the one writer, ended) before
    it runs ``inner`` (which then just ends the sandbox).

    ``cwd`` and ``image_env``: the image's WorkingDir and Env (issue 17), the
    daemon's and so its processes' defaults; Env comes after ours and wins.

    ``nsenter`` joins the prepared user namespace (and the prepared network
    namespace, if any) and becomes root in it; bwrap, unprivileged outside,
    makes the other namespaces and the mount tree from the overlay.
    """
    argv = ["nsenter", f"--user={userns}"]
    if netns:
        argv.append(f"--net={netns}")
    argv += [
        "--",
        BWRAP,
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        *([] if netns else ["--unshare-net"]),
        "--unshare-cgroup-try",
        "--hostname",
        hostname,
        "--new-session",
        "--bind",
        str(layout.root),
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        # Fixed sizes: nothing the sandbox writes lands on the host's disk, and
        # its memory cgroup is charged for these pages as well.
        "--size",
        str(SHM_TMPFS_BYTES),
        "--tmpfs",
        "/dev/shm",
        "--size",
        str(RUN_TMPFS_BYTES),
        "--tmpfs",
        "/run",
        "--ro-bind",
        "/sys",
        "/sys",
        # bwrap's /dev is a tmpfs of no fixed size: read-only once its nodes are
        # made (/dev/shm and /dev/pts are mounts of their own and stay writable).
        "--remount-ro",
        "/dev",
    ]
    for src, dst in ro_binds or []:
        argv += ["--ro-bind", src, dst]
    for src, dst in cgroup_binds or []:
        argv += ["--bind", src, dst]
    if block_fd is not None:
        argv += ["--block-fd", str(block_fd)]
    if info_fd is not None:
        argv += ["--info-fd", str(info_fd)]
    if seccomp_fd is not None:
        # Loaded by bwrap right before it execs the daemon: every process of
        # the sandbox is filtered, bwrap's own setup is not.
        argv += ["--seccomp", str(seccomp_fd)]
    argv += ["--chdir", cwd, "--clearenv"]
    for key, value in sandbox_env(hostname, image_env):
        argv += ["--setenv", key, value]
    argv += [
        "--",
        *inner,
    ]
    return argv


def sandbox_env(
    hostname: str, image_env: list[tuple[str, str]] | None = None
) -> list[tuple[str, str]]:
    """The daemon's environment (and so its processes' default): ours, then the image's Env."""
    ours = [("PATH", PATH), ("HOME", "/root"), ("LANG", "C.UTF-8"), ("HOSTNAME", hostname)]
    return ours + list(image_env or [])


# -- making and removing a sandbox's files -------------------------------------


def make_dirs(layout: Layout, disk_mb: int | None, uid: int) -> None:
    """The sandbox's dir (root's alone), its disk (when ``disk_mb``) and the layer dirs."""
    if len(str(layout.socket)) > MAX_SOCKET_PATH:
        raise LaunchError(
            f"socket path {layout.socket} is longer than {MAX_SOCKET_PATH} bytes; "
            "use a shorter --state-dir"
        )
    layout.dir.mkdir(parents=True, exist_ok=True)
    # Entered by root and by the sandboxes' own gid (bwrap, as the sandbox's
    # root, binds the overlay below it by path), by no other user of the machine.
    os.chown(layout.dir, 0, uid)
    os.chmod(layout.dir, 0o710)
    layout.rw.mkdir(exist_ok=True)
    layout.root.mkdir(exist_ok=True)
    if disk_mb is not None:
        disk.create(layout.disk_image, layout.rw, disk_mb)
    for d in (layout.upper, layout.work):
        d.mkdir(mode=0o755, exist_ok=True)
        os.chown(d, uid, uid)


def mount_root(layout: Layout, image: Image) -> None:
    opts = f"lowerdir={image.rootfs},upperdir={layout.upper},workdir={layout.work}"
    # nodev: a device node in an image (or made in the layer) opens nothing;
    # the sandbox's /dev is bwrap's own. nosuid: a setuid file the sandbox
    # plants raises nobody's privileges, outside or inside (the daemon switches
    # users itself, with no setuid program).
    _mount("overlay", str(layout.root), "overlay", MS_NODEV | MS_NOSUID, opts)


def listen(layout: Layout) -> socket.socket:
    """The daemon's listening socket, made by the host (root-only, 0600)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(layout.socket)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(layout.socket))
        os.chmod(layout.socket, 0o600)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise LaunchError(f"mount {fstype} on {target}: {os.strerror(err)}")


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, timeout=30)
    if r.returncode != 0:
        raise LaunchError(f"{' '.join(argv)}: {r.stderr.decode(errors='replace').strip()}")


def _umount(path: Path) -> None:
    while os.path.ismount(path):
        r = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
        if r.returncode != 0:
            # Still busy (a dying process): detach it; the kernel frees it when idle.
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)
            return


def remove_dir(layout: Layout) -> None:
    # Unmount first, the overlay before the disk under it: rmtree must not walk
    # into a mounted tree, and the loop device is only freed by the unmount.
    _umount(layout.root)
    disk.remove(layout.rw)
    shutil.rmtree(layout.dir, ignore_errors=True)


# -- the user namespace ----------------------------------------------------------


def owner_uid(sandbox_id: str) -> int:
    """The uid that owns a sandbox's user namespace (see ``OWNER_BASE``).

    From the id, so a restarted host finds the same one; two live sandboxes
    share one with odds of about n²/2²⁵ (n = 200: 0.1 %), and then share one
    budget of kernel counters, still not root's.
    """
    return OWNER_BASE + zlib.crc32(sandbox_id.encode()) % OWNER_SLOTS


async def make_userns(uid_offset: int, owner: int) -> int:
    """A user namespace owned by ``owner``, mapping 0..65535 to ``uid_offset``..; an fd to it.

    A short-lived ``unshare --user`` process running as ``owner`` makes it (the
    kernel charges the namespace's per-user counters to its creator's uid), the
    host writes the maps (root may map any range; no /etc/subuid), and the fd
    keeps it alive after that process is gone, until nsenter has joined it.
    """
    holder = await asyncio.create_subprocess_exec(
        "unshare",
        "--user",
        "--",
        "sleep",
        "30",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env=LAUNCH_ENV,
        user=owner,
        group=owner,
        extra_groups=[],
    )
    try:
        mine = os.readlink("/proc/self/ns/user")
        path = f"/proc/{holder.pid}/ns/user"
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(OSError):
                if os.readlink(path) != mine:
                    break
            if holder.returncode is not None or time.monotonic() > deadline:
                raise LaunchError("could not make a user namespace (unshare --user)")
            await asyncio.sleep(0.001)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{holder.pid}/{name}", "w") as f:
                    f.write(f"0 {uid_offset} {UID_COUNT}\n")
        except OSError as exc:
            os.close(fd)
            raise LaunchError(f"could not map the sandbox's users: {exc}") from exc
        return fd
    finally:
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
        await holder.wait()


async def launch(
    layout: Layout,
    cgroup: cg.SandboxCgroup | None,
    hostname: str,
    image: Image,
    daemon: DaemonRuntime,
    disk_mb: int | None = None,
    *,
    netns: str | asyncio.Future[str | None] | None = None,
    seed: Callable[[Path], None] | None = None,
    nested_userns: bool = False,
    zygote: Zygote | None = None,
) -> asyncio.subprocess.Process:
    """Start the sandbox; returns the launcher's process (the daemon may not answer yet).

    ``zygote``: its daemon is forked by that zygote (``zygote.py``) rather than
    started by exec; if the zygote fails, the same sandbox takes the exec path.

    ``nested_userns``: the seccomp filter lets root inside make user and
    network namespaces of its own (podman, bwrap inside); off by default.

    ``netns``: a network namespace path (``/run/netns/<name>``) to run the
    sandbox in, or a future of one (being set up meanwhile: the caller awaits
    it if this raises first); None = a new one with loopback only. ``seed``: called with the
    sandbox's writable dir (``layout.rw``) after it is made and before the
    overlay is mounted on it (a snapshot restore fills it).
    """
    uid = image.uid_offset
    phases = Phases(hostname)
    # Independent of the disk and the overlay: made alongside them (as the
    # network is, by the caller), so a create waits for the longest, not the sum.
    making_userns = asyncio.ensure_future(make_userns(uid, owner_uid(hostname)))
    try:
        await _blocking(make_dirs, layout, disk_mb, uid)
        phases.mark("dirs+disk")
        listener = await _blocking(listen, layout)
        if seed is not None:
            await _blocking(seed, layout.rw)
        await _blocking(mount_root, layout, image)
        phases.mark("listen+overlay")
        if cgroup is not None:
            await _blocking(cgroup.delegate, uid)
    except BaseException:
        await _discard_userns(making_userns)
        raise
    procs = cgroup.procs_files() if cgroup is not None else []
    fds: list[int] = [listener.detach()]
    log = None
    try:
        try:
            userns = await making_userns
        finally:
            phases.mark("userns")
        fds.append(userns)
        if netns is not None and not isinstance(netns, str):
            netns = await netns
            phases.mark("network")
        filter_fd = (
            seccomp.memfd(allow_nested_userns=nested_userns) if seccomp.supported() else None
        )
        if filter_fd is not None:
            fds.append(filter_fd)
        # On the sandbox's own disk: what its daemon prints counts against disk_mb.
        log = open(layout.log, "ab")  # noqa: SIM115 - handed to the child, closed below
        cgroups = cgroup is not None
        user = image.config.user

        def argv(inner: list[str], block: int | None = None, info: int | None = None) -> list[str]:
            return bwrap_argv(
                layout,
                hostname,
                inner,
                userns=f"/proc/self/fd/{userns}",
                ro_binds=daemon.binds(),
                cgroup_binds=cgroup.binds() if cgroup is not None else None,
                netns=netns,
                seccomp_fd=filter_fd,
                cwd=image.cwd,
                image_env=image.config.env_pairs(),
                block_fd=block,
                info_fd=info,
            )

        if zygote is not None:
            from . import zygote_launch
            from .zygote import ZygoteError

            try:
                return await zygote_launch.start(
                    zygote,
                    argv=lambda block, info, ended: argv(daemon.waiter_argv(ended), block, info),
                    layout=layout,
                    pass_fds=fds,
                    listen_fd=fds[0],
                    userns_fd=userns,
                    netns=netns,
                    log=log,
                    procs=procs,
                    serve_args=daemon.serve_args(zygote_child.LISTEN_FD, cgroups, user),
                    env=sandbox_env(hostname, image.config.env_pairs()),
                    cwd=image.cwd,
                    nested_userns=nested_userns,
                    enter=lambda: _enter(procs),
                    phases=phases,
                )
            except ZygoteError as exc:
                if exc.unsettled:
                    raise LaunchError(str(exc)) from exc
                log_fallback(hostname, exc)
                if filter_fd is not None:
                    os.lseek(filter_fd, 0, os.SEEK_SET)  # the first bwrap read it to its end
        return await asyncio.create_subprocess_exec(
            *argv(daemon.argv(fds[0], cgroups=cgroups, user=user)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=LAUNCH_ENV,
            pass_fds=fds,
            # Own session: a Ctrl-C at the host's terminal is not the sandbox's.
            start_new_session=True,
            preexec_fn=lambda: _enter(procs),
        )
    finally:
        if log is not None:
            log.close()
        for fd in fds:
            os.close(fd)


class Phases:
    """How long each step of a launch took (a debug line per sandbox: the bench's profile)."""

    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self.t = time.monotonic()
        self.parts: list[str] = []

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.parts.append(f"{name}={(now - self.t) * 1000:.1f}ms")
        self.t = now

    def done(self) -> None:
        _log.debug("sandbox %s launch: %s", self.sandbox_id, " ".join(self.parts))


def log_fallback(sandbox_id: str, exc: Exception) -> None:
    _log.warning("sandbox %s: %s; starting its daemon by exec instead", sandbox_id, exc)


# The launches' blocking steps (mkfs and mount in a child, the overlay mount):
# mostly waiting, not computing, so a burst of creates runs them side by side
# here rather than queueing behind the loop's default pool (cores + 4 threads).
_LAUNCH_THREADS = ThreadPoolExecutor(max_workers=LAUNCH_THREADS, thread_name_prefix="launch")


async def _blocking(fn: Callable[..., T], *args: object) -> T:
    return await asyncio.get_running_loop().run_in_executor(_LAUNCH_THREADS, fn, *args)


async def _discard_userns(making: asyncio.Future[int]) -> None:
    """The launch failed before it used the namespace: no fd of it may leak."""
    if not making.done():
        making.cancel()
    with contextlib.suppress(BaseException):
        os.close(await making)


def _enter(procs: list[str]) -> None:
    """In the launcher's child, before exec: its cgroups, and the operator's descriptor limit.

    The host raised its own soft limit for its connections (``edge``); a
    sandbox starts from the limit the host was started with, as any service would.
    """
    if procs:
        cg.join(procs)
    resource.setrlimit(resource.RLIMIT_NOFILE, STARTED_WITH_NOFILE)


def log_tail(layout: Layout) -> str:
    with contextlib.suppress(OSError), open(layout.log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL))
        return f.read(LOG_TAIL).decode("utf-8", "replace").strip()
    return ""


async def healthy(session: aiohttp.ClientSession) -> bool:
    try:
        async with session.get(
            "http://sandbox/api/v1/health", timeout=aiohttp.ClientTimeout(total=2)
        ) as r:
            return r.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


async def wait_ready(
    session: aiohttp.ClientSession,
    layout: Layout,
    proc: asyncio.subprocess.Process | None,
    timeout_s: float,
) -> float:
    """Until the daemon answers health over its socket; returns the seconds it took."""
    t0 = time.monotonic()
    delay = 0.005
    while True:
        if layout.socket.exists() and await healthy(session):
            return time.monotonic() - t0
        if proc is not None and proc.returncode is not None:
            raise LaunchError(
                f"the sandbox exited with status {proc.returncode} before its daemon "
                f"answered: {log_tail(layout) or '(no output)'}"
            )
        if time.monotonic() - t0 > timeout_s:
            raise LaunchError(
                f"the sandbox's daemon did not answer within {timeout_s:g} s: "
                f"{log_tail(layout) or '(no output)'}"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
