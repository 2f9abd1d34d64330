"""Start a sandbox: bubblewrap around its own ``sandboxd serve`` on a unix socket.

The "default" image is the host's root filesystem bound read-only, with a
per-sandbox writable directory for each of /tmp, /root and /home and a private
/run, /dev/shm and /proc. The host state dir is hidden behind an empty tmpfs,
so no sandbox sees another's files. Namespaces: user, pid, mount, ipc, uts,
cgroup and net (loopback only: nothing on the host is reachable, and there is
no outbound network yet). The daemon is the host's interpreter and installed
package, reached through the read-only root (the project's venv included).

The host talks to the daemon over ``<sandbox dir>/run/d.sock``, which the
sandbox sees as ``/run/sandboxd/d.sock``: no TCP port per sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from . import cgroup as cg
from . import disk

SOCKET_NAME = "d.sock"
INNER_RUN = "/run/sandboxd"
WRITABLE = ("tmp", "root", "home")
PIDS_LIMIT = 1024
# The sandbox's daemon keeps this much for itself (its --memory-reserve), on top
# of memory_mb: processes get exactly memory_mb, and an OOM kills one of them,
# not the daemon.
DAEMON_RESERVE_MB = 64
# sockaddr_un.sun_path is 108 bytes with its NUL.
MAX_SOCKET_PATH = 107
LOG_TAIL = 2000

BWRAP = "bwrap"


class LaunchError(Exception):
    """The sandbox did not come up; the message says why (daemon log tail included)."""


def bwrap_available() -> str | None:
    """None if sandboxes can be made here, else the reason they cannot."""
    if shutil.which(BWRAP) is None:
        return "bubblewrap (bwrap) is not installed: apt-get install -y bubblewrap"
    if os.geteuid() != 0:
        return "sandboxd host must run as root (cgroups and namespaces)"
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
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def socket(self) -> Path:
        return self.run_dir / SOCKET_NAME

    @property
    def log(self) -> Path:
        return self.dir / "daemon.log"

    @property
    def rw(self) -> Path:
        """The writable dirs' parent: the mount point of the disk_mb filesystem."""
        return self.dir / "rw"

    @property
    def disk_image(self) -> Path:
        return self.dir / "disk.img"


def daemon_argv(python: str = sys.executable, cgroups: bool = True) -> list[str]:
    argv = [
        python,
        "-m",
        "sandboxd",
        "serve",
        "--unix",
        f"{INNER_RUN}/{SOCKET_NAME}",
        "--memory-reserve",
        f"{DAEMON_RESERVE_MB}M",
        "--log-level",
        "warning",
    ]
    # Without the sandbox's cgroups bound in, cgroupfs is read-only inside.
    return argv if cgroups else [*argv, "--no-cgroups"]


HIDDEN = ("/tmp", "/run", "/root", "/home")


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


def daemon_paths() -> list[str]:
    """What the daemon needs from the host that the sandbox's own dirs would hide.

    The interpreter (e.g. pyenv under /root), the venv and the sandboxd
    package are bound back read-only at their host paths.
    """
    import sandboxd

    wanted = {
        os.path.realpath(sys.base_prefix),
        os.path.realpath(sys.prefix),
        os.path.realpath(os.path.dirname(os.path.dirname(sandboxd.__file__))),
    }
    return sorted(p for p in wanted if _under(p, HIDDEN))


def bwrap_argv(
    layout: Layout,
    hostname: str,
    inner: list[str],
    ro_paths: list[str] | None = None,
    cgroup_binds: list[tuple[str, str]] | None = None,
) -> list[str]:
    """The bubblewrap command line for one sandbox (pure: tested without running it)."""
    argv = [
        BWRAP,
        "--unshare-user",
        "--uid",
        "0",
        "--gid",
        "0",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-net",
        "--unshare-cgroup-try",
        "--hostname",
        hostname,
        "--new-session",
        "--ro-bind",
        "/",
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/dev/shm",
        "--tmpfs",
        "/run",
    ]
    state = str(layout.state_dir.resolve())
    if not _under(state, HIDDEN):
        # Other sandboxes' dirs and the database live here.
        argv += ["--tmpfs", state]
    argv += ["--bind", str(layout.run_dir), INNER_RUN]
    for name in WRITABLE:
        argv += ["--bind", str(layout.rw / name), f"/{name}"]
    for path in ro_paths or []:
        argv += ["--ro-bind", path, path]
    for src, dst in cgroup_binds or []:
        argv += ["--bind", src, dst]
    argv += [
        "--chdir",
        "/root",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--setenv",
        "HOME",
        "/root",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--setenv",
        "HOSTNAME",
        hostname,
        "--",
        *inner,
    ]
    return argv


def prepare(layout: Layout, disk_mb: int | None) -> None:
    """Make the sandbox's dirs; on a disk_mb-sized ext4 when ``disk_mb`` is given."""
    if len(str(layout.socket)) > MAX_SOCKET_PATH:
        raise LaunchError(
            f"socket path {layout.socket} is longer than {MAX_SOCKET_PATH} bytes; "
            "use a shorter --state-dir"
        )
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    layout.rw.mkdir(exist_ok=True)
    if disk_mb is not None:
        disk.create(layout.disk_image, layout.rw, disk_mb)
    for name in WRITABLE:
        (layout.rw / name).mkdir(mode=0o755, exist_ok=True)
    os.chmod(layout.rw / "tmp", 0o1777)


async def launch(
    layout: Layout, cgroup: cg.SandboxCgroup | None, hostname: str, disk_mb: int | None = None
) -> asyncio.subprocess.Process:
    await asyncio.to_thread(prepare, layout, disk_mb)
    procs = cgroup.procs_files() if cgroup is not None else []
    log = open(layout.log, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        return await asyncio.create_subprocess_exec(
            *bwrap_argv(
                layout,
                hostname,
                daemon_argv(cgroups=cgroup is not None),
                daemon_paths(),
                cgroup.binds() if cgroup is not None else None,
            ),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            # Own session: a Ctrl-C at the host's terminal is not the sandbox's.
            start_new_session=True,
            preexec_fn=(lambda: cg.join(procs)) if procs else None,
        )
    finally:
        log.close()


def log_tail(layout: Layout) -> str:
    with contextlib.suppress(OSError):
        data = layout.log.read_bytes()[-LOG_TAIL:]
        return data.decode("utf-8", "replace").strip()
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


def remove_dir(layout: Layout) -> None:
    # Unmount first: rmtree must not walk into a mounted disk, and the loop
    # device is only freed by the unmount.
    disk.remove(layout.rw)
    shutil.rmtree(layout.dir, ignore_errors=True)
