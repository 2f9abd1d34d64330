"""``GET /api/v1/sockets`` (beyond the contract): the sandbox's TCP sockets and who holds them.

For the host's memory checkpoints under gVisor (``host/runtime/checkpoint.py``): runsc
20221219 saves a listening socket, but not one a process watches with epoll
(a save with a waiter on it is refused, and a refused save ends the
sandbox), and no connection to outside the sandbox. What decides is visible
in ``/proc``: ``/proc/net/tcp{,6}`` gives each socket's state and inode, and
``/proc/<pid>/fd`` who holds which inode and whether that process has an
epoll instance at all (``anon_inode:[eventpoll]``; epoll registrations are
not listed, so any epoll instance counts).

Read from the daemon's own ``/proc`` on each request; nothing is cached.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from aiohttp import web

routes = web.RouteTableDef()

STATES = {
    "01": "established",
    "02": "syn_sent",
    "03": "syn_recv",
    "04": "fin_wait1",
    "05": "fin_wait2",
    "06": "time_wait",
    "07": "close",
    "08": "close_wait",
    "09": "last_ack",
    "0A": "listen",
    "0B": "closing",
}
EPOLL = "anon_inode:[eventpoll]"


@dataclass(slots=True)
class Socket:
    protocol: str
    state: str
    local: str
    remote: str
    inode: int
    holders: list[dict[str, object]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "protocol": self.protocol,
            "state": self.state,
            "local": self.local,
            "remote": self.remote,
            "inode": self.inode,
            "holders": self.holders,
        }


def _address(hexed: str, v6: bool) -> str:
    """``0100007F:1F90`` → ``127.0.0.1:8080`` (the kernel prints each 32-bit word little-endian)."""
    host, _, port = hexed.partition(":")
    raw = bytes.fromhex(host)
    words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
    ip = b"".join(words)
    if v6:
        text = ":".join(ip[i : i + 2].hex() for i in range(0, 16, 2))
        return f"[{text}]:{int(port, 16)}"
    return f"{'.'.join(str(b) for b in ip)}:{int(port, 16)}"


def parse_proc_net_tcp(text: str, protocol: str) -> list[Socket]:
    """The rows of ``/proc/net/tcp`` (or ``tcp6``); malformed rows are skipped."""
    out = []
    v6 = protocol == "tcp6"
    for line in text.splitlines()[1:]:
        w = line.split()
        if len(w) < 10:
            continue
        try:
            out.append(
                Socket(
                    protocol,
                    STATES.get(w[3].upper(), w[3].lower()),
                    _address(w[1], v6),
                    _address(w[2], v6),
                    int(w[9]),
                )
            )
        except ValueError:
            continue
    return out


def holders() -> dict[int, list[dict[str, object]]]:
    """Socket inode → the processes holding it, each with whether it has an epoll instance."""
    by_inode: dict[int, list[dict[str, object]]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fd_dir = f"/proc/{name}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to read
        inodes: list[int] = []
        epoll = False
        for fd in fds:
            with contextlib.suppress(OSError):
                target = os.readlink(f"{fd_dir}/{fd}")
                if target == EPOLL:
                    epoll = True
                elif target.startswith("socket:["):
                    with contextlib.suppress(ValueError):
                        inodes.append(int(target[8:-1]))
        for inode in inodes:
            by_inode.setdefault(inode, []).append({"pid": int(name), "epoll": epoll})
    return by_inode


def tcp_sockets() -> list[Socket]:
    found: list[Socket] = []
    for protocol in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/net/{protocol}") as f:
            found += parse_proc_net_tcp(f.read(), protocol)
    owners = holders()
    for s in found:
        s.holders = owners.get(s.inode, [])
    return found


@routes.get("/api/v1/sockets")
async def list_sockets(request: web.Request) -> web.Response:
    return web.json_response({"sockets": [s.to_json() for s in tcp_sockets()]})
