"""``host/runtime/launcher.py`` with real processes: pidfds, and a network namespace held by a mount.

A stand-in launcher is ``unshare --net --fork sleep``: like bubblewrap, a
process in the host's namespaces whose child lives in a network namespace of
its own. No sandbox, no host; needs root for the namespace and the mount.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.host.runtime import launcher, mounts

from .conftest import skip_with_reason, wait_for


@pytest.fixture
def fake_launcher() -> Iterator[subprocess.Popen[bytes]]:
    if os.geteuid() != 0:
        skip_with_reason("a network namespace and a bind mount need root")
    # --kill-child: the sleep (and its namespace) go with the stand-in launcher.
    proc = subprocess.Popen(["unshare", "--net", "--fork", "--kill-child", "sleep", "60"])
    try:
        ours = os.stat("/proc/self/ns/net").st_ino

        def child_in_its_netns() -> bool:
            kids = launcher.children(proc.pid)
            return bool(kids) and os.stat(f"/proc/{kids[0]}/ns/net").st_ino != ours

        wait_for(child_in_its_netns, timeout=10)
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_a_pidfd_reads_ready_when_its_process_exits() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    fd = os.pidfd_open(proc.pid)
    try:
        assert not launcher.exited(fd)

        async def watch() -> None:
            waiter = asyncio.ensure_future(launcher.wait_exit(fd))
            await asyncio.sleep(0)
            assert not waiter.done()
            proc.kill()
            await asyncio.wait_for(waiter, 10)

        asyncio.run(watch())
        assert launcher.exited(fd)
    finally:
        os.close(fd)
        proc.kill()
        proc.wait(10)


def test_the_childs_netns_is_held_by_a_mount_until_released(
    fake_launcher: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    fd = os.pidfd_open(fake_launcher.pid)
    try:
        child = launcher.children(fake_launcher.pid)[0]
        held = launcher.hold_netns(tmp_path, fake_launcher.pid, fd)
        assert held == tmp_path / "netns" and str(held) in mounts.points()
        assert os.stat(held).st_ino == os.stat(f"/proc/{child}/ns/net").st_ino
        # Held twice is held once (a restarted host adopting it again).
        assert launcher.hold_netns(tmp_path, fake_launcher.pid, fd) == held
        assert mounts.points().count(str(held)) == 1
        # The namespace outlives its processes while the mount holds it.
        ino = os.stat(held).st_ino
        fake_launcher.kill()
        fake_launcher.wait(10)
        assert os.stat(held).st_ino == ino
        launcher.release_netns(tmp_path)
        assert str(held) not in mounts.points() and not held.exists()
    finally:
        os.close(fd)
        launcher.release_netns(tmp_path)


def test_nothing_is_held_once_the_launcher_has_exited(
    fake_launcher: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    fd = os.pidfd_open(fake_launcher.pid)
    try:
        pid = fake_launcher.pid
        fake_launcher.kill()
        deadline = time.monotonic() + 10
        while not launcher.exited(fd) and time.monotonic() < deadline:
            time.sleep(0.01)
        # Its pid may be anyone's by now: nothing found through it is trusted.
        assert launcher.hold_netns(tmp_path, pid, fd) is None
        assert not (tmp_path / "netns").exists()
    finally:
        os.close(fd)
