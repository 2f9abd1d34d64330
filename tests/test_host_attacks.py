"""Holes in a sandbox's walls, attacked from inside (as its root) and from the host (as another user).

Each test reproduces an attack that worked before the walls were closed:

- the host's environment read from inside (``/proc/1/environ``);
- a write that lands on the host's disk past ``disk_mb``;
- a local user of the host reaching into a sandbox (a planted setuid file, the
  daemon's socket, world-readable files, the databases);
- a sandbox spending the host root's per-user kernel budget (inotify instances).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import wait_for
from .test_host import IMAGES, NS, Host, _create, _run, assert_gone, make_state_root, start_host

CANARY = "SANDBOXD_TEST_CANARY_7f3a"
DEVICE_NODES = {f"/dev/{n}" for n in ("null", "zero", "full", "random", "urandom", "tty")}


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    for root in make_state_root("sba"):
        os.environ[CANARY] = "operator-secret"
        try:
            h = start_host(root / "s", warm=0)
        finally:
            del os.environ[CANARY]
        yield h
        h.stop()


@pytest.fixture
def sandbox(host: Host) -> Iterator[str]:
    with host.http() as c:
        sid = str(
            _create(c, resources={"cpus": 1.0, "memory_mb": 512, "disk_mb": 64})["sandbox_id"]
        )
    yield sid
    with host.http() as c:
        c.delete(f"{NS}/{sid}")
    assert_gone(host, sid)


def _as_user(uid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` as ``uid`` (no groups): an unprivileged local user of the host."""
    # Through sh: setpriv itself opens its command before it drops root, which
    # would reach paths the user cannot.
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return subprocess.run(
        [*drop, "sh", "-c", 'exec "$0" "$@"', *argv],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_no_process_inside_sees_the_host_environment(host: Host, sandbox: str) -> None:
    # The canary is in the host's environment (it started with it)...
    host_env = Path(f"/proc/{host.proc.pid}/environ").read_bytes()
    assert CANARY.encode() in host_env
    # ...and in no process of the sandbox: its init (bwrap), its daemon, this shell.
    code, out = _run(host, sandbox, "cat /proc/[0-9]*/environ | tr '\\0' '\\n'; echo END")
    assert code == 0 and out.rstrip().endswith("END"), out
    assert CANARY not in out and "operator-secret" not in out, out
    code, out = _run(host, sandbox, "tr '\\0' '\\n' < /proc/1/environ")
    assert code == 0 and "PATH=" in out and CANARY not in out, out


def test_every_writable_path_is_the_sandbox_disk_or_a_small_tmpfs(host: Host, sandbox: str) -> None:
    # The old hole: /run/sandboxd was a bind of a host directory, writable inside.
    code, out = _run(host, sandbox, "test -e /run/sandboxd && echo present || echo absent")
    assert out.strip() == "absent", out
    # Every writable mount inside: the root (overlay whose upper layer is on the
    # sandbox's disk_mb disk) or a tmpfs of a fixed size; nothing bound from the host.
    code, out = _run(host, sandbox, "cat /proc/self/mountinfo")
    assert code == 0, out
    writable = []
    for line in out.splitlines():
        fields = line.split()
        mnt, opts = fields[4], fields[5].split(",")
        fstype, super_opts = fields[-3], fields[-1]
        if mnt in DEVICE_NODES and fstype == "devtmpfs":
            continue  # bwrap's binds of single device nodes: writing stores nothing
        if "rw" in opts and fstype not in ("proc", "devpts", "mqueue", "cgroup", "cgroup2"):
            writable.append((mnt, fstype, super_opts))
    for mnt, fstype, super_opts in writable:
        if mnt == "/":
            assert fstype == "overlay", writable
        else:
            assert fstype == "tmpfs" and "size=" in super_opts, writable
            size_k = int(super_opts.split("size=")[1].split(",")[0].rstrip("k"))
            assert size_k <= 64 * 1024, writable
    # The attack itself: 300 MB into each writable place ends early with ENOSPC (or EROFS).
    for place in ("/run", "/dev/shm", "/dev", "/tmp", "/root"):
        code, out = _run(host, sandbox, f"dd if=/dev/zero of={place}/fill bs=1M count=300 2>&1")
        assert code != 0 and ("No space left" in out or "Read-only" in out), (place, out)
        _run(host, sandbox, f"rm -f {place}/fill")


def test_a_local_user_cannot_reach_into_a_sandbox(host: Host, sandbox: str) -> None:
    # Root inside plants a setuid copy of `id` and a world-readable secret.
    code, out = _run(
        host,
        sandbox,
        "cp /usr/bin/id /tmp/suid-id && chmod 4755 /tmp/suid-id && "
        "echo inside-secret > /tmp/world && chmod 644 /tmp/world && ls -l /tmp/suid-id",
    )
    assert code == 0 and out.startswith("-rwsr-xr-x"), out
    sdir = host.state / "sandboxes" / sandbox
    planted = sdir / "root/tmp/suid-id"
    assert planted.stat().st_mode & 0o4000 and planted.stat().st_uid == 100000
    # nobody cannot reach the planted file, nor any file of the sandbox.
    r = _as_user(65534, str(planted), "-u")
    assert r.returncode != 0 and "100000" not in r.stdout, (r.stdout, r.stderr)
    r = _as_user(65534, "cat", str(sdir / "root/tmp/world"))
    assert r.returncode != 0 and "inside-secret" not in r.stdout, r.stdout
    for uid in (65534, 100000):  # nobody, and the sandboxes' own uid on the host
        # The daemon's socket: a connect is refused before any HTTP is spoken.
        probe = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            f"    s.connect({str(sdir / 'd.sock')!r})\n"
            "except OSError as e:\n"
            "    sys.exit(f'refused: {e}')\n"
            "print('CONNECTED')\n"
        )
        r = _as_user(uid, "python3", "-c", probe)
        assert r.returncode != 0 and "CONNECTED" not in r.stdout, (uid, r.stdout, r.stderr)
        # The records and the image store are root's alone.
        for db in ("sandboxes.db", "catalog.db"):
            r = _as_user(uid, "cat", str(host.state / db))
            assert r.returncode != 0, (uid, db)
        r = _as_user(uid, "ls", str(IMAGES / "default/rootfs"))
        assert r.returncode != 0, (uid, r.stdout)
    # Even reached by root's own path, the planted file raises nobody: the
    # overlay is mounted nosuid (and nodev) on the host as inside.
    line = next(
        ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if f" {sdir}/root " in ln
    )
    opts = line.split()[5].split(",")
    assert "nosuid" in opts and "nodev" in opts, line
    for db in ("sandboxes.db", "catalog.db"):
        assert (host.state / db).stat().st_mode & 0o077 == 0


INOTIFY_HOG = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
n = 0
while n < 10000 and libc.inotify_init1(os.O_CLOEXEC) >= 0:
    n += 1
print(n, os.strerror(ctypes.get_errno()), flush=True)
sys.stdin.read()  # hold them until the test lets go
"""


def _host_root_can_inotify() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0:
        return False
    os.close(fd)
    return True


def test_a_sandbox_spends_its_own_kernel_budget_not_host_roots(host: Host, sandbox: str) -> None:
    from tensorlake.sandbox import Sandbox, StdinMode

    sbx = Sandbox.connect(sandbox, api_url=host.url, api_key=None)
    proc = sbx.start_process("python3", args=["-c", INOTIFY_HOG], stdin_mode=StdinMode.PIPE)
    try:

        def held() -> str:
            return "".join(sbx.get_stdout(proc.pid).lines)

        wait_for(lambda: held().strip() != "", timeout=30)
        n = int(held().split()[0])
        # The sandbox got a budget (and no more than the per-user limit)...
        limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
        assert 0 < n <= limit, held()
        # ...and it was not root's: root on the host still makes instances.
        assert _host_root_can_inotify()
    finally:
        sbx.kill_process(proc.pid)


def test_nested_user_namespaces_only_with_the_host_opt_in(host: Host, sandbox: str) -> None:
    # By default root inside cannot make a user namespace (it would own a
    # network namespace there, and nf_tables with it)...
    code, out = _run(host, sandbox, "unshare -Ur true")
    assert code != 0, out
    # ...and a host started with --allow-nested-userns lets it.
    for root in make_state_root("sbn"):
        opted = start_host(root / "s", warm=0, extra_args=["--no-net", "--allow-nested-userns"])
        try:
            with opted.http() as c:
                sid = str(_create(c, resources={"cpus": 1.0, "memory_mb": 256})["sandbox_id"])
            code, out = _run(opted, sid, "unshare -Ur sh -c 'id -u; cat /proc/self/uid_map'")
            assert code == 0 and out.split()[0] == "0", out
            with opted.http() as c:
                c.delete(f"{NS}/{sid}")
            assert_gone(opted, sid)
        finally:
            opted.stop()


def test_a_process_closing_its_pipes_never_kills_the_daemon(host: Host, sandbox: str) -> None:
    """A write to a pipe whose reader is gone is an error for that request, not a SIGPIPE.

    A process (as nobody, here) closes the stdin the daemon writes to, and its
    stdout; writing to it then must leave the daemon, and the sandbox, running.
    """
    from tensorlake.sandbox import Sandbox, StdinMode

    sbx = Sandbox.connect(sandbox, api_url=host.url, api_key=None)
    p = sbx.start_process(
        "setpriv",
        args=["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c",
              "exec 0<&- 1>&- 2>&-; sleep 30"],
        stdin_mode=StdinMode.PIPE,
    )  # fmt: skip
    wait_for(lambda: "sleep" in sbx.run("ps", args=["-eo", "args"]).stdout, timeout=20)
    for _ in range(3):
        try:
            sbx.write_stdin(p.pid, b"x" * 70000)  # more than a pipe holds
        except Exception as exc:  # refused: the reader is gone
            assert "502" not in str(exc), exc
    assert sbx.run("echo", args=["alive"]).stdout.strip() == "alive"
    with host.http() as c:
        assert c.get(f"{NS}/{sandbox}").json()["status"] == "running"
