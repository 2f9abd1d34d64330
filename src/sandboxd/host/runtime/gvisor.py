"""The gVisor runtime: each sandbox under ``runsc``, its own kernel in user space.

With the default runtime (``runtime.py``) a sandbox's processes make their
system calls to the host's kernel, behind namespaces and a seccomp filter: a
kernel bug reachable through an allowed call is a host compromise. Under
gVisor they make them to the sandbox's Sentry (a kernel written in Go, one per
sandbox), which itself uses a small, filtered set of host calls. What stays
the same as the default runtime:

- **Root filesystem**: the same image and the same writable layer on the
  sandbox's ``disk_mb`` disk, so snapshots (an archive of that layer, made on
  the host while the cgroup is frozen) and restores work unchanged, and a
  snapshot from one runtime restores in the other. The overlay is mounted on
  the host over *idmapped* views of the image and of the layer (uid 100000 on
  disk is 0 in the view; ``gvisor_root.py``), because runsc's file server (the
  Gofer) runs as the host's root: the sandbox sees its files owned by root, and what its root
  writes lands on disk as uid 100000, as under bubblewrap.
- **Limits**: runsc runs inside the sandbox's cgroups (``--ignore-cgroups``
  and the launcher joins them first), so memory, CPUs, pids, the freezer
  (suspend, snapshot) and the OOM count are the same files.
- **Network**: the sandbox's prepared netns (``network.py``: veth and nft
  policy), or one of its own with loopback only. By default the Sentry runs
  its own network stack over that netns's interfaces (:data:`NETSTACK`), so
  runsc can save the sandbox (``checkpoint.py``: memory snapshots, live
  copies, suspend to disk); the policy is enforced where it always is, on the
  veth's far end in the router namespace. ``SANDBOXD_HOST_GVISOR_NETWORK=host``
  keeps the older mode (:data:`HOSTINET`, runsc's ``--network=host``): the
  Sentry's sockets are host sockets in that netns, and runsc cannot save them.
- **The daemon**: the host's interpreter and sandboxd, bound read-only
  (:class:`runtime.DaemonRuntime`), started with ``--no-cgroups``.

How the host reaches the daemon: a unix socket made inside gVisor is the
Sentry's own, and a host socket cannot be handed in. So the daemon listens on
TCP, and the host connects from a thread that entered a netns
(:class:`NetnsConnector`). On gVisor's own stack (the default) that is a
private veth link from a netns of the host's own (:meth:`Gvisor._make_control`,
the daemon on ``CONTROL_IP:DAEMON_PORT``); with hostinet it is
``127.0.0.1:DAEMON_PORT`` in the sandbox's netns, as for exposed ports.
Anything inside can connect to that port, so the daemon asks for a token of
its own (``--token``, given in its environment, which the daemon drops before
it starts anything), kept in the sandbox's root-only dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.client_exceptions import ClientConnectorError

from ..images.image_store import Image
from ..network import sandbox_network as network
from ..proxy import http_proxy as proxy
from . import bubblewrap as runtime
from . import cgroup as cg
from . import gvisor_root

log = logging.getLogger("sandboxd.host")

# Only ptrace works on machines without usable KVM (nested guests); see docs/gvisor.md.
DEFAULT_PLATFORM = "ptrace"
PLATFORM_ENV = "SANDBOXD_HOST_GVISOR_PLATFORM"
# How a sandbox's sockets are served (docs/gvisor.md, "The network: gVisor's own
# stack, or the host's"): "sandbox" (gVisor's own stack, the default: memory
# checkpoints, live copies and suspend to disk work; the host reaches the daemon
# over a private link) or "host" (hostinet: the host's stack in the sandbox's
# netns; runsc refuses to checkpoint it). Read once, when the host starts; each
# sandbox keeps the mode it was started with (its bundle's daemon.json).
NETWORK_ENV = "SANDBOXD_HOST_GVISOR_NETWORK"
HOSTINET = "host"
NETSTACK = "sandbox"
NETWORKS = (HOSTINET, NETSTACK)
DEFAULT_NETWORK = NETSTACK
# The private link of a netstack sandbox: a veth pair between its netns (the
# Sentry takes that end) and a netns of the host's own, where nothing else runs.
# The same addresses for every sandbox: each pair is alone in its namespaces,
# and a restored copy finds its daemon where the original had it.
CONTROL_HOST_IP = "169.254.49.1"
CONTROL_IP = "169.254.49.2"
CONTROL_PREFIX = 30
CONTROL_IF_HOST = "gvctl0"
CONTROL_IF = "gvctl1"
# Everything the host exchanges with the daemon (files, output, exposed ports)
# crosses this link. At 1500 bytes gVisor's stack sends a 64 MiB download in
# 45,000 packets, about 3x slower than the host's stack (make bench, figure
# gvisor); at 65000 it matches it. Nothing else uses the link.
CONTROL_MTU = 65000
# runsc 20221219 takes a netns with /proc/sys/net/core/rmem_default for the
# machine's own and refuses to start its network stack there; since Linux 5.x
# every netns has that file. Hidden under an empty tmpfs in a private mount
# namespace for runsc's start and restore (the sandbox's netns is entered first).
NETSTACK_SHIM = 'mount -t tmpfs -o size=4k,mode=0555 none /proc/sys/net/core && exec "$@"'
# Where the daemon listens inside (loopback of the sandbox's own netns only).
DAEMON_PORT = 49983
# Python starts in about 1.6 s under ptrace (0.05 s natively): the daemon needs longer.
STARTUP_TIMEOUT_S = 90.0
RUNSC_PATHS = ("/usr/bin/runsc", "/usr/sbin/runsc", "/usr/local/bin/runsc")
BUNDLE = "gvisor"
STATE = "daemon.json"
# In a sandbox's dir: the image a memory snapshot's restore starts from (removed once up).
RESTORE_IMAGE = "restore-image"
# In its bundle: the checkpoint of a sandbox suspended to disk.
SUSPENDED_IMAGE = "suspended"
COMMAND_TIMEOUT_S = 30
# Saving writes the sandbox's whole memory (up to memory_mb) to disk.
CHECKPOINT_TIMEOUT_S = 300
BOOT_MAIN = "from sandboxd.cli import main"
BOOT_PIDFD = "import sandboxd.host.runtime.gvisor_pidfd as p; p.install()"
# A daemon runsc can save: its event loop on poll(2), not epoll. runsc 20221219
# refuses to save a TCP socket with a waiter; an epoll registration stays one
# for as long as the socket is watched, a poll(2) lasts only as long as the call
# (and a save interrupts the call).
BOOT_POLL = "import sandboxd.host.runtime.gvisor_pidfd as p; p.poll_event_loop()"
RLIMIT_NOFILE = 65536

# Root inside is root of the Sentry, not of the host: the capabilities gVisor knows,
# but those over the network (NET_ADMIN, NET_RAW): with them root could change its
# addresses and routes (the Sentry's own on netstack) or forge packets.
CAPABILITIES = [
    "CAP_" + c
    for c in [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
    ]
]


def runsc_path() -> str | None:
    found = shutil.which("runsc")
    if found:
        return found
    return next((p for p in RUNSC_PATHS if os.access(p, os.X_OK)), None)


def network_problem(value: str | None) -> str | None:
    """Why ``value`` (of :data:`NETWORK_ENV`) is no network mode, if it is none."""
    if not value or value in NETWORKS:
        return None
    return (
        f"{NETWORK_ENV}={value!r} is not a gVisor network mode: leave it unset for "
        f"gVisor's own network stack ({NETSTACK!r}, the default: memory snapshots and "
        f"suspend to disk), or set {HOSTINET!r} for the host's stack in the sandbox's "
        "netns (no memory snapshots); see docs/gvisor.md"
    )


def available(state_dir: Path) -> str | None:
    """None if gVisor sandboxes can be made here, else the reason they cannot."""
    problem = network_problem(os.environ.get(NETWORK_ENV))
    if problem is not None:
        return problem
    if runsc_path() is None:
        return "runsc (gVisor) is not installed: apt-get install -y runsc"
    if shutil.which("ip") is None:
        return "ip is not installed: apt-get install -y iproute2"
    where = state_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        gvisor_root.probe(where)
    except OSError as exc:
        return f"this kernel cannot make idmapped mounts for gVisor's root filesystem: {exc}"
    return None


def mount_root(layout: runtime.Layout, image: Image) -> None:
    """The overlay at ``layout.root``, over idmapped views of the image and the layer."""
    gvisor_root.mount(
        layout.root, image.rootfs, layout.rw, layout.upper, layout.work, image.uid_offset
    )


# -- the OCI bundle (pure) ---------------------------------------------------------


def daemon_argv(
    daemon: runtime.DaemonRuntime,
    port: int = DAEMON_PORT,
    host: str = "127.0.0.1",
    savable: bool = False,
) -> list[str]:
    """The daemon's command line, listening on TCP (``host``) instead of a host socket.

    ``savable``: with an event loop runsc can checkpoint (:data:`BOOT_POLL`).
    """
    argv = list(daemon.argv(0, cgroups=False))
    for flag in ("--listen-fd", "--unix"):
        if flag in argv:
            i = argv.index(flag)
            argv[i : i + 2] = ["--host", host, "--port", str(port)]
    # The start-up line: process descriptors first, where this gVisor lacks them.
    i = argv.index("-c") + 1
    if BOOT_MAIN not in argv[i]:
        raise runtime.LaunchError(f"the daemon's start-up line has no {BOOT_MAIN!r}")
    boot = f"{BOOT_PIDFD}; {BOOT_POLL}" if savable else BOOT_PIDFD
    argv[i] = argv[i].replace(BOOT_MAIN, f"{boot}; {BOOT_MAIN}", 1)
    return argv


def oci_config(
    layout: runtime.Layout,
    hostname: str,
    argv: list[str],
    *,
    netns: str,
    ro_binds: list[tuple[str, str]],
) -> dict[str, Any]:
    """The sandbox's ``config.json`` (OCI runtime spec 1.0, as runsc reads it)."""
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["size=64m"]},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["size=64m"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
    ]
    for src, dst in ro_binds:
        mounts.append(
            {"destination": dst, "type": "bind", "source": src, "options": ["rbind", "ro"]}
        )
    caps = list(CAPABILITIES)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": argv,
            # The same fixed environment as under bubblewrap; the token is added at launch.
            "env": [f"PATH={runtime.PATH}", "HOME=/root", "LANG=C.UTF-8", f"HOSTNAME={hostname}"],
            "cwd": "/root",
            "capabilities": {
                k: caps for k in ("bounding", "effective", "permitted", "inheritable")
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": RLIMIT_NOFILE, "soft": RLIMIT_NOFILE}],
        },
        "root": {"path": str(layout.root), "readonly": False},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": netns},
            ],
        },
    }


def runsc_flags(runsc: str, root: Path, platform: str, net: str = DEFAULT_NETWORK) -> list[str]:
    """runsc and its global flags: the same for every command on one container."""
    return [
        runsc,
        f"--root={root}",
        f"--platform={platform}",
        # hostinet: the Sentry's sockets are host sockets in the sandbox's netns,
        # where the host's thread connects to the daemon and the nft policy applies.
        # netstack: gVisor's own stack over the netns's interfaces (checkpointable).
        f"--network={net}",
        # The launcher is already in the sandbox's cgroups; runsc makes none.
        "--ignore-cgroups",
        # Writes go to the overlay on disk_mb, not to the Sentry's memory.
        "--overlay2=none",
    ]


def runsc_argv(
    runsc: str,
    root: Path,
    platform: str,
    bundle: Path,
    container: str,
    net: str = DEFAULT_NETWORK,
    image: Path | None = None,
) -> list[str]:
    """``runsc run`` (or ``restore`` from a checkpoint ``image`` dir), attached."""
    flags = runsc_flags(runsc, root, platform, net)
    if image is None:
        return [*flags, "run", f"--bundle={bundle}", container]
    return [*flags, "restore", f"--image-path={image}", f"--bundle={bundle}", container]


def in_netns_argv(netns: str, argv: list[str], shim: bool = False) -> list[str]:
    """``argv`` run in a netstack sandbox's netns: runsc's control socket is an
    abstract one, seen only there. ``shim``: with :data:`NETSTACK_SHIM` (run, restore)."""
    entered = ["nsenter", f"--net={netns}", "--"]
    if not shim:
        return [*entered, *argv]
    return [
        *entered,
        *["unshare", "--mount", "--propagation", "private", "--"],
        *["sh", "-c", NETSTACK_SHIM, "runsc-netstack", *argv],
    ]


# -- where the host reaches a sandbox's daemon -------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    netns: str
    port: int
    token: str
    host: str = "127.0.0.1"


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    if host == "127.0.0.1":
        sock = network.connect_local(port, timeout)
    else:
        sock = socket.create_connection((host, port), timeout)
        sock.setblocking(False)
    # Closed by a reset, never a FIN exchange: a websocket's close handshake has
    # the daemon close first, which leaves its end in TIME_WAIT inside the
    # Sentry for a minute, and runsc 20221219 refuses to save (and so loses) a
    # sandbox with any such endpoint. A reset ends both ends at once. The host
    # closes a connection only once it has read what it wanted from it.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return sock


class NetnsConnector(aiohttp.BaseConnector):
    """Connections to ``host:port`` (loopback by default) made inside a network namespace."""

    def __init__(self, netns: str, port: int, host: str = "127.0.0.1") -> None:
        super().__init__(limit=100)
        self.netns, self.port, self.host = netns, port, host

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        try:
            sock = await network.in_netns(
                self.netns, lambda: _connect(self.host, self.port, timeout.sock_connect or 5)
            )
            _, proto = await self._loop.create_connection(self._factory, sock=sock)
        except OSError as exc:
            raise ClientConnectorError(req.connection_key, exc) from exc
        return proto


async def _drop_origin(session: Any, ctx: Any, params: aiohttp.TraceRequestStartParams) -> None:
    # The host's edge has checked the client's Origin. The daemon, on TCP here
    # (not a unix socket), would check it again against its own port and refuse
    # the SDK's websocket Origin (the host's port).
    params.headers.popall("Origin", None)


_NO_ORIGIN = aiohttp.TraceConfig()
_NO_ORIGIN.on_request_start.append(_drop_origin)


class Sessions(proxy.Sessions):
    """The proxy's sessions, with a gVisor sandbox's daemon reached over its netns."""

    def __init__(
        self, socket_of: Callable[[str], str], address_of: Callable[[str], Address | None]
    ):
        super().__init__(socket_of)
        self._address_of = address_of

    def get(self, sandbox_id: str) -> aiohttp.ClientSession:
        s = self._sessions.get(sandbox_id)
        if s is not None and not s.closed:
            return s
        addr = self._address_of(sandbox_id)
        if addr is None:
            return super().get(sandbox_id)
        s = aiohttp.ClientSession(
            connector=NetnsConnector(addr.netns, addr.port, addr.host),
            # The client's own Authorization never reaches a sandbox (proxy.py): this one does.
            headers={"Authorization": f"Bearer {addr.token}"},
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            trace_configs=[_NO_ORIGIN],
        )
        self._sessions[sandbox_id] = s
        return s


# -- the runtime ---------------------------------------------------------------------


async def _run(argv: list[str], timeout: float = COMMAND_TIMEOUT_S) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace").strip()


@dataclass(frozen=True, slots=True)
class MemoryImage:
    """A checkpoint to start a sandbox from, given by a restore's seed.

    The seed puts runsc's image in the new sandbox's :data:`RESTORE_IMAGE` dir
    (with the files). The daemon restored from it still holds the token it was
    started with, so the new sandbox's host side must present that one.
    """

    token: str


class CheckpointError(Exception):
    """runsc could not save or restore a sandbox; the message says why."""


def _why(out: str) -> str:
    """The reason in runsc's error, without the object dump and stack it may carry."""
    at = out.find("save rejected")
    if at >= 0:
        return out[at : at + 300].splitlines()[0]
    first = out.splitlines()[0]
    # "encoding error at object <dump>: <reason>:" — the reason is at the end.
    if len(first) > 600 and ": " in first:
        return first[:120] + " … " + first.rstrip(":").rsplit("}: ", 1)[-1][-400:]
    return first[:600]


class Gvisor:
    """One host's gVisor sandboxes: their runsc state dir, bundles and loopback netns."""

    def __init__(
        self, state_dir: Path, tag: str, platform: str | None = None, net: str | None = None
    ) -> None:
        self.state_dir = state_dir
        self.tag = tag
        self.platform = platform or os.environ.get(PLATFORM_ENV) or DEFAULT_PLATFORM
        if net is not None and net not in NETWORKS:
            raise ValueError(f"net must be one of {', '.join(NETWORKS)}, not {net!r}")
        configured = os.environ.get(NETWORK_ENV)
        if net is None and network_problem(configured) is not None:
            # A gVisor host refuses to start with it (available()); a default
            # runtime's host only tears gVisor sandboxes down, each with its own mode.
            log.warning("%s", network_problem(configured))
            configured = None
        self.net = net or configured or DEFAULT_NETWORK
        # runsc's own state (one dir per container), root's alone.
        self.root = state_dir / "runsc"

    def layout(self, sandbox_id: str) -> runtime.Layout:
        return runtime.Layout(self.state_dir, sandbox_id)

    def bundle(self, sandbox_id: str) -> Path:
        return self.layout(sandbox_id).dir / BUNDLE

    def own_netns(self, sandbox_id: str) -> str:
        """The netns made here for a sandbox the network module gave none (loopback only)."""
        return f"{self.tag}-gv-{sandbox_id}"

    def control_netns(self, sandbox_id: str) -> str:
        """The host's end of a netstack sandbox's private link to its daemon."""
        return f"{self.tag}-gc-{sandbox_id}"

    def _state(self, sandbox_id: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.bundle(sandbox_id) / STATE).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def address(self, sandbox_id: str) -> Address | None:
        """Where its daemon listens, if the sandbox runs under gVisor."""
        data = self._state(sandbox_id)
        try:
            assert data is not None
            host = str(data.get("host", "127.0.0.1"))
            return Address(data["netns"], int(data["port"]), data["token"], host)
        except (AssertionError, ValueError, KeyError, TypeError):
            return None

    def checkpointable(self, sandbox_id: str) -> bool:
        """Whether runsc can save this sandbox: under gVisor, on gVisor's own network stack.

        Read from the sandbox's own state: one started under hostinet (by a
        host run with ``host``, or before netstack became the default) stays so.
        """
        data = self._state(sandbox_id)
        return data is not None and data.get("network") == NETSTACK

    def sandbox_netns(self, sandbox_id: str) -> str | None:
        data = self._state(sandbox_id)
        return None if data is None else data.get("sandbox_netns", data.get("netns"))

    def netns_path(self, sandbox_id: str) -> str | None:
        addr = self.address(sandbox_id)
        return addr.netns if addr is not None else None

    async def _make_netns(self, name: str) -> str:
        code, out = await _run(["ip", "netns", "add", name])
        if code != 0:
            raise runtime.LaunchError(f"ip netns add {name}: {out}")
        code, out = await _run(["ip", "-n", name, "link", "set", "lo", "up"])
        if code != 0:
            await _run(["ip", "netns", "del", name])
            raise runtime.LaunchError(f"loopback of {name}: {out}")
        return str(network.NETNS_DIR / name)

    async def _make_control(self, sandbox_id: str, netns: str) -> str:
        """The private link host <-> daemon of a netstack sandbox; its host-side netns."""
        ctl = self.control_netns(sandbox_id)
        inner = Path(netns).name  # both are named netns (network.NETNS_DIR)
        path = await self._make_netns(ctl)
        veth = ["type", "veth", "peer", "name", CONTROL_IF, "netns", inner]
        for argv in (
            ["ip", "-n", ctl, "link", "add", CONTROL_IF_HOST, *veth],
            ["ip", "-n", ctl, "addr", "add", f"{CONTROL_HOST_IP}/{CONTROL_PREFIX}", "dev"],
            ["ip", "-n", inner, "addr", "add", f"{CONTROL_IP}/{CONTROL_PREFIX}", "dev"],
            ["ip", "-n", ctl, "link", "set", CONTROL_IF_HOST, "mtu", str(CONTROL_MTU), "up"],
            ["ip", "-n", inner, "link", "set", CONTROL_IF, "mtu", str(CONTROL_MTU), "up"],
        ):
            if argv[-1] == "dev":
                argv.append(CONTROL_IF_HOST if argv[2] == ctl else CONTROL_IF)
            code, out = await _run(argv)
            if code != 0:
                raise runtime.LaunchError(f"{' '.join(argv)}: {out}")
        return path

    async def _interfaces(self, netns: str) -> tuple[list[list[str]], list[str]]:
        """The IPv4 addresses and routes of the netns, as runsc will take them.

        runsc moves them into the Sentry's stack (and off the host's interfaces):
        a restore in place needs them back on the interfaces first.
        """
        inner = Path(netns).name
        _, out = await _run(["ip", "-n", inner, "-4", "-o", "addr", "show"])
        addrs = []
        for line in out.splitlines():
            words = line.split()
            if len(words) >= 4 and words[2] == "inet" and words[1] != "lo":
                addrs.append([words[1].split("@")[0], words[3]])
        _, out = await _run(["ip", "-n", inner, "-4", "route", "show"])
        return addrs, [r for r in out.splitlines() if r.strip()]

    async def _put_back_interfaces(self, sandbox_id: str) -> None:
        data = self._state(sandbox_id) or {}
        inner = Path(str(data.get("sandbox_netns", ""))).name
        for dev, cidr in data.get("addrs", []):
            await _run(["ip", "-n", inner, "addr", "replace", cidr, "dev", dev])
        for route in data.get("routes", []):
            await _run(["ip", "-n", inner, "route", "replace", *route.split()])

    async def launch(
        self,
        layout: runtime.Layout,
        cgroup: cg.SandboxCgroup | None,
        hostname: str,
        image: Image,
        daemon: runtime.DaemonRuntime,
        disk_mb: int | None = None,
        *,
        netns: str | None = None,
        seed: Callable[[Path], None] | None = None,
    ) -> asyncio.subprocess.Process:
        """Start the sandbox under runsc (as :func:`runtime.launch` does under bubblewrap).

        A ``seed`` with a ``memory`` (:class:`MemoryImage`, a memory snapshot's)
        restores its processes too: ``runsc restore`` instead of ``runsc run``.
        """
        runsc = runsc_path()
        if runsc is None:
            raise runtime.LaunchError("runsc (gVisor) is not installed: apt-get install -y runsc")
        memory: MemoryImage | None = getattr(seed, "memory", None)
        if memory is not None and self.net != NETSTACK:
            raise runtime.LaunchError(
                f"a memory snapshot restores only on gVisor's own network stack ({NETWORK_ENV}="
                f"{NETSTACK}); this host runs {self.net}"
            )
        await asyncio.to_thread(runtime.make_dirs, layout, disk_mb, image.uid_offset)
        if seed is not None:
            await asyncio.to_thread(seed, layout.rw)
        try:
            await asyncio.to_thread(mount_root, layout, image)
        except OSError as exc:
            raise runtime.LaunchError(f"gVisor root filesystem: {exc}") from exc
        if netns is None:
            netns = await self._make_netns(self.own_netns(layout.sandbox_id))
        state: dict[str, Any] = {"netns": netns, "port": DAEMON_PORT, "network": self.net}
        host = "127.0.0.1"
        if self.net == NETSTACK:
            host = CONTROL_IP
            state["netns"] = await self._make_control(layout.sandbox_id, netns)
            state["sandbox_netns"] = netns
            state["host"] = host
            state["addrs"], state["routes"] = await self._interfaces(netns)
        token = memory.token if memory is not None else secrets.token_urlsafe(24)
        state["token"] = token
        config = oci_config(
            layout,
            hostname,
            daemon_argv(daemon, host=host, savable=self.net == NETSTACK),
            netns=netns,
            ro_binds=daemon.binds(),
        )
        config["process"]["env"].append(f"SANDBOXD_TOKEN={token}")
        bundle = self.bundle(layout.sandbox_id)

        def write() -> None:
            self.root.mkdir(mode=0o700, exist_ok=True)
            bundle.mkdir(mode=0o700, exist_ok=True)
            for name, data in (("config.json", config), (STATE, state)):
                fd = os.open(bundle / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f)

        await asyncio.to_thread(write)
        image_dir = layout.dir / RESTORE_IMAGE if memory is not None else None
        return await self.spawn(layout, cgroup, image_dir)

    async def spawn(
        self, layout: runtime.Layout, cgroup: cg.SandboxCgroup | None, image: Path | None = None
    ) -> asyncio.subprocess.Process:
        """runsc (run, or restore from ``image``) on the bundle written by :meth:`launch`."""
        runsc = runsc_path()
        if runsc is None:
            raise runtime.LaunchError("runsc (gVisor) is not installed: apt-get install -y runsc")
        sid = layout.sandbox_id
        data = self._state(sid) or {}
        net = data.get("network", HOSTINET)
        argv = runsc_argv(runsc, self.root, self.platform, self.bundle(sid), sid, net, image)
        if net == NETSTACK:
            argv = in_netns_argv(str(data["sandbox_netns"]), argv, shim=True)
        procs = cgroup.procs_files() if cgroup is not None else []
        log_file = open(layout.log, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                # runsc keeps these open as long as the sandbox runs.
                stdout=log_file,
                stderr=log_file,
                env=runtime.LAUNCH_ENV,
                start_new_session=True,
                # runsc and everything it starts (Sentry, Gofer) are in the sandbox's cgroups.
                preexec_fn=(lambda: cg.join(procs)) if procs else None,
            )
        finally:
            log_file.close()

    async def _runsc(self, sandbox_id: str, *args: str, timeout: float = COMMAND_TIMEOUT_S) -> str:
        """A runsc command on one container, where its control socket is seen."""
        runsc = runsc_path()
        if runsc is None:
            raise CheckpointError("runsc (gVisor) is not installed")
        data = self._state(sandbox_id) or {}
        net = data.get("network", HOSTINET)
        argv = [*runsc_flags(runsc, self.root, self.platform, net), *args]
        if net == NETSTACK:
            argv = in_netns_argv(str(data["sandbox_netns"]), argv)
        code, out = await _run(argv, timeout)
        if code != 0:
            log.warning("runsc %s of %s failed (status %d): %s", args[0], sandbox_id, code, out)
            raise CheckpointError(f"runsc {args[0]}: {_why(out) if out else f'status {code}'}")
        return out

    async def tcp_table(self, sandbox_id: str) -> str | None:
        """The Sentry's ``/proc/net/tcp``, read by a process runsc starts in the sandbox.

        Not over the network: a connection of the host's would be one more
        connection in the table (and one more a save refuses). None if it
        cannot be read (no ``cat`` in the image, runsc failed).
        """
        try:
            return await self._runsc(sandbox_id, "exec", sandbox_id, "cat", "/proc/net/tcp")
        except (CheckpointError, OSError, TimeoutError):
            return None

    async def checkpoint(self, sandbox_id: str, image_dir: Path) -> None:
        """Save the sandbox's memory and processes into ``image_dir``; the container stops.

        runsc 20221219's ``--leave-running`` hangs (its restore misses the
        ``--ignore-cgroups`` of the original), so a caller that wants it running
        again restores it in place (:meth:`restore_in_place`).
        """
        image_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            await self._runsc(
                sandbox_id, "checkpoint", f"-image-path={image_dir}", sandbox_id,
                timeout=CHECKPOINT_TIMEOUT_S,
            )  # fmt: skip
        except (CheckpointError, OSError, TimeoutError):
            if await self.running(sandbox_id):
                raise  # refused before it stopped anything: it runs on
            await self.forget(sandbox_id)
            raise
        # Stopped: its state must go before a restore under the same id.
        await self.forget(sandbox_id)

    async def running(self, sandbox_id: str) -> bool:
        """Whether runsc says the container runs."""
        try:
            out = await self._runsc(sandbox_id, "state", sandbox_id)
            return json.loads(out).get("status") == "running"
        except (CheckpointError, OSError, TimeoutError, ValueError, AttributeError):
            return False

    async def forget(self, sandbox_id: str) -> None:
        """runsc's state of a stopped container (before a restore under its id)."""
        with contextlib.suppress(CheckpointError, OSError, TimeoutError):
            await self._runsc(sandbox_id, "delete", "--force", sandbox_id)

    async def restore_in_place(
        self, layout: runtime.Layout, cgroup: cg.SandboxCgroup | None, image_dir: Path
    ) -> asyncio.subprocess.Process:
        """The sandbox again from its own checkpoint: same bundle, netns, overlay and token."""
        await self._put_back_interfaces(layout.sandbox_id)
        return await self.spawn(layout, cgroup, image_dir)

    async def wait_ready(
        self,
        session: aiohttp.ClientSession,
        layout: runtime.Layout,
        proc: asyncio.subprocess.Process | None,
        timeout_s: float,
    ) -> float:
        """Until the daemon answers health; as :func:`runtime.wait_ready`, with no socket file."""
        t0 = time.monotonic()
        while True:
            if await runtime.healthy(session):
                # A restored sandbox runs from memory now: its image is no longer read.
                await asyncio.to_thread(
                    shutil.rmtree, layout.dir / RESTORE_IMAGE, ignore_errors=True
                )
                return time.monotonic() - t0
            if proc is not None and proc.returncode is not None:
                raise runtime.LaunchError(
                    f"runsc exited with status {proc.returncode} before the daemon answered: "
                    f"{runtime.log_tail(layout) or '(no output)'}"
                )
            if time.monotonic() - t0 > timeout_s:
                raise runtime.LaunchError(
                    f"the sandbox's daemon (gVisor) did not answer within {timeout_s:g} s: "
                    f"{runtime.log_tail(layout) or '(no output)'}"
                )
            await asyncio.sleep(0.05)

    async def teardown(self, sandbox_id: str) -> None:
        """runsc's container state and the loopback netns; never raises.

        Its processes are gone with its cgroup already (or killed here when
        the host has no cgroups); the overlay and dirs go with ``runtime.remove_dir``.
        """
        runsc = runsc_path()
        if self._state_files(sandbox_id):
            if runsc is not None:
                with contextlib.suppress(OSError, asyncio.TimeoutError):
                    await _run([runsc, f"--root={self.root}", "delete", "--force", sandbox_id])
            # runsc failed or is gone: its state is only files.
            for p in self._state_files(sandbox_id):
                with contextlib.suppress(OSError):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        for name in (self.own_netns(sandbox_id), self.control_netns(sandbox_id)):
            if (network.NETNS_DIR / name).exists():
                with contextlib.suppress(OSError, asyncio.TimeoutError):
                    await _run(["ip", "netns", "del", name])

    def _state_files(self, sandbox_id: str) -> list[Path]:
        """runsc's files for one container under ``--root``."""
        with contextlib.suppress(OSError):
            return [p for p in self.root.iterdir() if p.name.startswith(sandbox_id)]
        return []

    def containers(self) -> set[str]:
        """Sandbox ids runsc has state for (in its --root)."""
        with contextlib.suppress(OSError):
            return {p.name[:20] for p in self.root.iterdir() if p.name.startswith("sbx-")}
        return set()

    async def sweep(self, keep: set[str]) -> None:
        """Start-up: runsc state and loopback netns of sandboxes no longer live."""
        for sid in self.containers() - keep:
            log.info("removing leftover gVisor container %s", sid)
            await self.teardown(sid)
        with contextlib.suppress(OSError):
            for prefix in (f"{self.tag}-gv-", f"{self.tag}-gc-"):
                for p in network.NETNS_DIR.iterdir():
                    if p.name.startswith(prefix) and p.name[len(prefix) :] not in keep:
                        await self.teardown(p.name[len(prefix) :])
