"""What this host can ever give one sandbox: a create asking for more is refused up front.

Not what is free now (that changes; the kernel's limits and the disk's quota
enforce it): the machine's whole memory and the whole filesystem the state
dir is on. A create that no amount of waiting could satisfy gets a 400 with
the host's figure, instead of a sandbox that fails, or is OOM-killed, later.
"""

from __future__ import annotations

import os
from pathlib import Path

from .model import CreateSpec, bad
from .runtime import bubblewrap as runtime


def memory_total_mb() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def disk_total_mb(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize // (1 << 20)


def check(spec: CreateSpec, state_dir: Path) -> None:
    """Raise 400 ``MEMORY_TOO_LARGE`` / ``DISK_TOO_LARGE`` for what the host never has."""
    check_sizes(spec.memory_mb, spec.disk_mb, state_dir)


def check_sizes(memory_mb: int, disk_mb: int, state_dir: Path) -> None:
    mem = memory_total_mb()
    if mem is not None:
        most = mem - runtime.DAEMON_RESERVE_MB
        if memory_mb > most:
            raise bad(
                "MEMORY_TOO_LARGE",
                f"memory_mb={memory_mb} is more than this host can ever give a sandbox "
                f"({mem} MiB of memory, {runtime.DAEMON_RESERVE_MB} MiB kept for its daemon): "
                f"ask for at most {most}",
            )
    disk = disk_total_mb(state_dir)
    if disk is not None and disk_mb > disk:
        raise bad(
            "DISK_TOO_LARGE",
            f"disk_mb={disk_mb} is more than the filesystem of this host's state dir "
            f"holds ({disk} MiB in all): ask for at most {disk}",
        )


def check_network(spec_network: object, enabled: bool, reason: str | None) -> None:
    """A network policy on a host whose sandboxes have loopback only would be a lie: refused."""
    if spec_network is not None and not enabled:
        raise bad(
            "NETWORK_UNAVAILABLE",
            f"this host's sandboxes have no network ({reason or 'networking is off'}), so a "
            "network policy would not apply: leave out network/allow_internet_access/allow_out/"
            "deny_out, or start `sandboxd host` without --no-net",
        )
