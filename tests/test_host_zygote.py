"""The zygote (``host/runtime/zygote.py``): a forked daemon is walled in exactly like an exec'd one.

Every attack runs from inside a sandbox, as its root, against the daemon that
serves it (the parent of the command's shell, ``$PPID``), and compares with a
host whose zygote is off (``SANDBOXD_HOST_ZYGOTE=0``: the exec path) where it
can. The first test checks the daemon really came from the zygote, so each
of these fails if the zygote path is gone rather than passing vacuously.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import wait_for
from .test_host import NS, Host, _create, _run, assert_gone, make_state_root, start_host

# What a process's status says about its walls.
WALLS = (
    "Seccomp",
    "Seccomp_filters",
    "NoNewPrivs",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
)
STATUS_OF_DAEMON = (
    "grep -E '^(" + "|".join(WALLS) + "):' /proc/$PPID/status; "
    # Its limits too: the zygote's imports must not carry the host's raised ones.
    "grep -E '^Max (open files|processes)' /proc/$PPID/limits; "
    # ...nor its processes' (the spawner restores the limit it was started with).
    "echo nofile $(ulimit -Sn) $(ulimit -Hn)"
)


@pytest.fixture(scope="module")
def roots() -> Iterator[Path]:
    yield from make_state_root("sbz")


@pytest.fixture(scope="module")
def host(roots: Path) -> Iterator[Host]:
    h = start_host(roots / "z", warm=0, env={"SANDBOXD_HOST_ZYGOTE": "1"})
    yield h
    h.stop()


@pytest.fixture(scope="module")
def exec_host(roots: Path) -> Iterator[Host]:
    h = start_host(roots / "x", warm=0, env={"SANDBOXD_HOST_ZYGOTE": "0"})
    yield h
    h.stop()


@contextlib.contextmanager
def sandbox(h: Host) -> Iterator[str]:
    with h.http() as c:
        sid = str(
            _create(c, resources={"cpus": 1.0, "memory_mb": 256, "disk_mb": 64})["sandbox_id"]
        )
    try:
        yield sid
    finally:
        with h.http() as c:
            c.delete(f"{NS}/{sid}")
        assert_gone(h, sid)


def _zygote_pids() -> list[int]:
    """Zygotes on this machine (any host's): processes whose cmdline runs zygote_child, in our pid ns."""
    ours = os.readlink("/proc/self/ns/pid")
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            zygote = b"zygote_child import run" in (d / "cmdline").read_bytes()
            if (
                zygote
                and os.readlink(d / "ns/pid") == ours
                and "bwrap" not in (d / "comm").read_text()
            ):
                out.append(int(d.name))
    return out


def _daemon_host_pid(sandbox_id: str) -> int:
    """The sandbox's daemon, seen from the host: in its cgroup, in the sandbox's pid ns, not bwrap."""
    ours = os.readlink("/proc/self/ns/pid")
    for procs in Path("/sys/fs/cgroup/pids").glob(f"**/sandboxd-host*/{sandbox_id}/cgroup.procs"):
        for pid in procs.read_text().split():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/ns/pid") != ours and (
                    Path(f"/proc/{pid}/comm").read_text().strip() != "bwrap"
                ):
                    status = Path(f"/proc/{pid}/status").read_text().splitlines()
                    nspid = next(line for line in status if line.startswith("NSpid:"))
                    if nspid.split()[-1] == "2":  # bwrap's init is 1, the daemon 2
                        return int(pid)
    raise AssertionError(f"no daemon found for {sandbox_id}")


def test_the_daemon_comes_from_the_zygote_and_the_switch_turns_it_off(
    host: Host, exec_host: Host
) -> None:
    with sandbox(host) as sid:
        code, out = _run(host, sid, "tr '\\0' ' ' < /proc/$PPID/cmdline")
        assert code == 0 and "sandboxd-zygote-fork serve" in out, out
    assert "zygote for image default ready" in host.log()
    with sandbox(exec_host) as sid:
        code, out = _run(exec_host, sid, "tr '\\0' ' ' < /proc/$PPID/cmdline")
        assert code == 0 and "sandboxd-zygote-fork" not in out and "sandboxd.cli" in out, out
    assert "zygote for image" not in exec_host.log()


def test_seccomp_no_new_privs_and_capabilities_are_those_of_an_exec_daemon(
    host: Host, exec_host: Host
) -> None:
    with sandbox(host) as sid:
        code, forked = _run(host, sid, STATUS_OF_DAEMON)
        assert code == 0, forked
        # Its own user namespace's map: root inside is uid 100000+ outside, not the host's root.
        code, uid_map = _run(host, sid, "cat /proc/$PPID/uid_map; cat /proc/$PPID/gid_map")
    with sandbox(exec_host) as sid:
        code, execd = _run(exec_host, sid, STATUS_OF_DAEMON)
        assert code == 0, execd
    assert forked == execd, (forked, execd)
    walls = dict(line.split(":\t") for line in forked.strip().splitlines() if ":\t" in line)
    assert walls["Seccomp"] == "2" and walls["NoNewPrivs"] == "1", walls
    rows = [line.split() for line in uid_map.strip().splitlines()]
    assert len(rows) == 2 and all(r[0] == "0" and int(r[1]) >= 100000 for r in rows), uid_map


def test_its_capabilities_reach_nothing_of_the_host(host: Host) -> None:
    zygotes = _zygote_pids()
    assert zygotes, "no zygote process found"
    with sandbox(host) as sid:
        daemon = _daemon_host_pid(sid)
        # Host pids, the zygote's first: none is visible, none can be signalled or traced.
        script = (
            "for p in " + " ".join(str(p) for p in [*zygotes, os.getpid(), daemon]) + "; do "
            "  if [ -e /proc/$p ]; then echo visible $p; fi; "
            "  kill -0 $p 2>/dev/null && echo signalled $p; "
            "done; "
            # The sandbox's own processes only: its init (bwrap), the daemon, this shell's tree.
            "echo count=$(ls /proc | grep -cE '^[0-9]+$'); "
            # The runtime the host binds in, and the cgroup limits, stay the host's.
            "{ echo x > /run/sandboxd-rt/py/planted && echo planted; } 2>/dev/null; "
            "{ echo 1 > /sys/fs/cgroup/pids/pids.max && echo raised-limit; } 2>/dev/null; "
            "true"
        )
        code, out = _run(host, sid, script)
        assert code == 0, out
        words = out.split()
        assert not {"visible", "signalled", "planted", "raised-limit"} & set(words), out
        count = next(int(w.split("=")[1]) for w in words if w.startswith("count="))
        assert count <= 8, out  # bwrap, the daemon, sh, ls, grep (+ a racing child)
        # ptrace of the zygote from inside: not even a pid to name (python's own ctypes).
        code, out = _run(
            host,
            sid,
            "python3 -c 'import ctypes,json,sys; l=ctypes.CDLL(None, use_errno=True); "
            "print(json.dumps([(l.ptrace(16, int(p), 0, 0), ctypes.get_errno()) "
            "for p in sys.argv[1:]]))' " + " ".join(str(p) for p in zygotes),
        )
        assert code == 0, out
        # PTRACE_ATTACH fails with ESRCH: no such process.
        assert all(r == -1 and err == 3 for r, err in json.loads(out.strip())), out
        # The daemon's exe and maps name paths of the sandbox, not of the host.
        code, out = _run(
            host, sid, "readlink /proc/$PPID/exe; cut -c74- /proc/$PPID/maps | sort -u"
        )
        assert code == 0, out
        for path in (p.strip() for p in out.splitlines() if p.strip().startswith("/")):
            assert path.startswith(("/run/sandboxd-rt/", "/usr/", "/lib", "/etc/")), out


def test_no_descriptor_of_the_daemon_leads_outside(host: Host, exec_host: Host) -> None:
    def fds(h: Host, sid: str) -> list[str]:
        code, out = _run(h, sid, "for f in /proc/$PPID/fd/*; do readlink $f; done")
        assert code == 0, out
        return sorted(out.split())

    with sandbox(host) as sid:
        forked = fds(host, sid)
        daemon = _daemon_host_pid(sid)
        own_log = str(host.state / "sandboxes" / sid / "rw" / "daemon.log")
        # Sockets and pipes by inode ("socket:[N]"): the zygote's, and the daemon's seen from the host.
        zygote_ends = {
            t for z in _zygote_pids() for t in _fd_targets(z) if t.startswith(("socket:", "pipe:"))
        }
        daemon_ends = {t for t in _fd_targets(daemon) if t.startswith(("socket:", "pipe:"))}
    kinds = ("socket:[", "pipe:[", "anon_inode:", "/dev/null")
    for target in forked:
        assert target.startswith(kinds) or target == own_log, forked
    # Nothing the zygote holds (its socket to the host) is the daemon's.
    assert zygote_ends and daemon_ends
    assert not zygote_ends & daemon_ends, (zygote_ends & daemon_ends, forked)
    with sandbox(exec_host) as sid:
        execd = fds(exec_host, sid)

    def shape(targets: list[str]) -> list[str]:
        return sorted(
            t.split("[")[0].split(":")[0] if not t.startswith("/") else "file" for t in targets
        )

    # The exec'd daemon holds as many of each kind, plus nothing more.
    assert shape(forked).count("file") == shape(execd).count("file"), (forked, execd)
    assert len(forked) <= len(execd) + 1, (forked, execd)


def test_two_sandboxes_share_nothing_writable(host: Host) -> None:
    with sandbox(host) as a, sandbox(host) as b:
        marks = "/tmp/mark /root/mark /run/mark /dev/shm/mark"
        code, out = _run(host, a, f"for f in {marks}; do echo from-a > $f || exit 1; done; "
                         "readlink /proc/$PPID/ns/mnt /proc/$PPID/ns/pid /proc/$PPID/ns/net")  # fmt: skip
        assert code == 0, out
        ns_a = out.split()
        code, out = _run(host, b, f"cat {marks} 2>&1; "
                         "readlink /proc/$PPID/ns/mnt /proc/$PPID/ns/pid /proc/$PPID/ns/net")  # fmt: skip
        assert "from-a" not in out, out
        ns_b = out.split()[-3:]
        assert all(x != y for x, y in zip(ns_a, ns_b, strict=True)), (ns_a, ns_b)
        # Memory too: each daemon's copy of a module global is its own.
        code, out = _run(host, a, "echo ok")
        assert code == 0


def test_a_killed_daemon_fails_the_sandbox_and_a_restarted_host_keeps_the_others(
    roots: Path,
) -> None:
    h = start_host(roots / "r", warm=0)
    try:
        with h.http() as c:
            keeper = str(_create(c, resources={"memory_mb": 256})["sandbox_id"])
            victim = str(_create(c, resources={"memory_mb": 256})["sandbox_id"])
        _, out = _run(h, keeper, "tr '\\0' ' ' < /proc/$PPID/cmdline")
        assert "sandboxd-zygote-fork serve" in out, out
        # SIGKILL of the daemon from inside: noticed (its launcher ends), the record fails.
        with contextlib.suppress(Exception):  # the request dies with the daemon
            _run(h, victim, "kill -9 $PPID; sleep 5")
        with h.http() as c:
            wait_for(lambda: c.get(f"{NS}/{victim}").json()["status"] != "running", timeout=15)
            rec = c.get(f"{NS}/{victim}").json()
        assert (rec["status"], rec["termination_reason"]) == ("failed", "daemon_died"), rec
        assert_gone(h, victim)
        zygotes_before = {p for p in _zygote_pids() if _is_descendant(p, h.proc.pid)}
        assert len(zygotes_before) == 1, zygotes_before
        h.stop()
        # The zygote went with its host; the daemons it made did not.
        wait_for(lambda: not (zygotes_before & set(_zygote_pids())), timeout=10)
        h = start_host(roots / "r", warm=0)
        with h.http() as c:
            assert c.get(f"{NS}/{keeper}").json()["status"] == "running"
        assert _run(h, keeper, "echo still here")[1].strip() == "still here"
        # ...and its end is still noticed by the new host.
        os.kill(_daemon_host_pid(keeper), signal.SIGKILL)
        with h.http() as c:
            wait_for(lambda: c.get(f"{NS}/{keeper}").json()["status"] != "running", timeout=15)
            rec = c.get(f"{NS}/{keeper}").json()
        assert rec["termination_reason"] == "daemon_died", rec
        assert_gone(h, keeper)
    finally:
        _end_all(h, roots / "r")


def test_a_dead_zygote_falls_back_to_exec_with_a_log_line(roots: Path) -> None:
    h = start_host(roots / "f", warm=0)
    try:
        wait_for(lambda: "zygote for image default ready" in h.log(), timeout=30)
        ours = [p for p in _zygote_pids() if _is_descendant(p, h.proc.pid)]
        assert len(ours) == 1, ours
        os.kill(ours[0], signal.SIGKILL)
        wait_for(lambda: "unavailable (it exited)" in h.log(), timeout=10)
        # While a new one starts, creates take the exec path and still work.
        with h.http() as c:
            sid = str(_create(c, resources={"memory_mb": 256})["sandbox_id"])
        code, out = _run(h, sid, "tr '\\0' ' ' < /proc/$PPID/cmdline")
        assert code == 0 and "sandboxd.cli" in out and "sandboxd-zygote-fork" not in out, out
        # ...and once it is up, they take the zygote's again.
        wait_for(lambda: h.log().count("zygote for image default ready") >= 2, timeout=30)
        with h.http() as c:
            again = str(_create(c, resources={"memory_mb": 256})["sandbox_id"])
        code, out = _run(h, again, "tr '\\0' ' ' < /proc/$PPID/cmdline")
        assert code == 0 and "sandboxd-zygote-fork serve" in out, out
        with h.http() as c:
            c.delete(f"{NS}/{sid}")
            c.delete(f"{NS}/{again}")
        assert_gone(h, sid)
        assert_gone(h, again)
    finally:
        _end_all(h, roots / "f")


def _end_all(h: Host, state: Path) -> None:
    """Whatever a failed test left running (sandboxes outlive a stopped host) goes."""
    if h.proc.poll() is not None:
        h = start_host(state, warm=0)
    with h.http() as c:
        for s in c.get(NS).json()["sandboxes"]:
            c.delete(f"{NS}/{s['id']}")
            assert_gone(h, s["id"])
    h.stop()


def _fd_targets(pid: int) -> set[str]:
    out = set()
    for f in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            out.add(os.readlink(f))
    return out


def _is_descendant(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def test_a_launcher_is_watched_through_a_descriptor_past_1024() -> None:
    """A host holding ~100 sandboxes has fds past select()'s limit (found by 100 creates at once)."""
    import resource
    import subprocess

    from sandboxd.host.runtime import launcher

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip(f"the hard descriptor limit is {hard}: no fd past 2000 to test with")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    proc = subprocess.Popen(["sleep", "30"])
    fd = os.pidfd_open(proc.pid)
    high = os.dup2(fd, 2000)
    try:
        assert launcher.exited(high) is False
        proc.kill()
        proc.wait()
        assert launcher.exited(high) is True
    finally:
        os.close(high)
        os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_zygote_s_bubblewrap_dies_with_its_host_even_when_the_host_ends_at_once() -> None:
    """The zygote's spawn (host/runtime/zygote.py's ``_with_the_host``), with real processes.

    A host that ended between forking the zygote's bwrap and bwrap setting its
    own death signal (a node that could not join its fleet, ending at once)
    left the zygote running, holding the host's stdout and stderr. Here a stand-in
    host spawns a long sleep the way the host spawns bwrap and is SIGKILLed:
    the sleep goes with it. And a child whose host is gone before its exec
    (its parent is no longer the one that forked it) does not run at all.
    """
    stand_in = (
        "import os, subprocess, sys\n"
        "from sandboxd.host.runtime.zygote import _with_the_host\n"
        "p = subprocess.Popen(['sleep', '300'], preexec_fn=_with_the_host(os.getpid()),\n"
        "                     start_new_session=True, stdout=subprocess.DEVNULL,\n"
        "                     stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    host = subprocess.run([sys.executable, "-c", stand_in], capture_output=True, text=True, timeout=60)
    assert host.returncode == -signal.SIGKILL, host.stderr
    orphan = int(host.stdout.split()[0])

    def gone() -> bool:
        try:
            state = Path(f"/proc/{orphan}/stat").read_text().split()[2]
        except OSError:
            return True
        return state == "Z"

    try:
        wait_for(gone, timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)
    from sandboxd.host.runtime.zygote import _with_the_host

    late = subprocess.run(["sh", "-c", "echo ran"], preexec_fn=_with_the_host(1), capture_output=True)
    assert late.returncode == 1 and late.stdout == b""
