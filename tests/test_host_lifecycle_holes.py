"""``sandboxd host``: what code running as root inside a sandbox could do to its own lifecycle.

* Killing its own daemon (issue 13, hole 8): the sandbox must end ``failed``
  with the cause, its cgroup, mounts and netns released, and the SDK answered
  at once, not with a 502 it retries for minutes. Also for a sandbox that
  outlived a restart of the host.
* A path longer than ``PATH_MAX`` in its layer (hole 9): the snapshot is
  refused with ``SNAPSHOT_UNRESTORABLE`` naming the path, never taken and then
  impossible to restore.
* Its network namespace (hole 10) is held by the host from the launch on (a
  bind mount), never looked up through a pid that can be reused; exposed
  ports are reached through it, across a restart too.

Real host subprocesses, real bubblewrap sandboxes, the official SDK.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import wait_for
from .test_host import NS, Host, _cgroup_dirs, _cleanup, assert_gone, make_state_root, start_host

# Kills the sandbox's daemon from inside, as root there: the process whose argv
# is the daemon's (``serve ... --memory-reserve``), never this script itself
# (whose argv holds these words inside one element, not as elements).
KILL_DAEMON = """
import os, signal
for p in os.listdir('/proc'):
    if p.isdigit():
        try:
            argv = open(f'/proc/{p}/cmdline', 'rb').read().split(b'\\0')
        except OSError:
            continue
        # The daemon's argv; bwrap's (PID 1 here, which carries it too) is not the target.
        if b'serve' in argv and b'--memory-reserve' in argv and b'bwrap' not in argv:
            os.kill(int(p), signal.SIGKILL)
"""

# A file under 25 nested dirs of 200 bytes each: more than PATH_MAX from
# /root. Made with relative mkdir/chdir, as a shell could not (its cd takes
# whole paths).
DEEP = """
import os
os.chdir('/root')
for _ in range(25):
    os.mkdir('d' * 200)
    os.chdir('d' * 200)
open('deep-file', 'w').write('deep')
print(len(os.getcwd()))
"""

APP = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b'held')
    def log_message(self, *a): pass
http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
"""


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from make_state_root("sbd")


@pytest.fixture(scope="module")
def host(state_root: Path) -> Iterator[Host]:
    h = start_host(state_root / "s", warm=0)
    yield h
    _cleanup(h)
    h.stop()


def _sdk(h: Host) -> dict[str, object]:
    return {"api_url": h.url, "api_key": None}


def _mounts_of(sandbox_id: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if sandbox_id in line]


def _kill_daemon_from_inside(sbx) -> None:  # type: ignore[no-untyped-def]
    from tensorlake.sandbox.exceptions import SandboxError

    # The request that kills the daemon loses its connection with it.
    with contextlib.suppress(SandboxError):
        sbx.run("python3", args=["-c", KILL_DAEMON])


def _assert_ended_by_its_daemons_death(h: Host, sbx) -> None:  # type: ignore[no-untyped-def]
    from tensorlake.sandbox.exceptions import RemoteAPIError

    sid = sbx.sandbox_id
    with h.http() as c:
        wait_for(lambda: c.get(f"{NS}/{sid}").json()["status"] != "running", timeout=15)
        rec = c.get(f"{NS}/{sid}").json()
    assert rec["status"] == "failed", rec
    assert rec["termination_reason"] == "daemon_died", rec
    assert "daemon died" in rec["error_details"]["message"], rec
    assert "sandbox_url" not in rec
    assert_gone(h, sid)
    assert _mounts_of(sid) == []
    # The SDK is told at once that the sandbox is not there (a 502 it would retry).
    with pytest.raises(RemoteAPIError) as e:
        sbx.run("true")
    assert e.value.status_code == 404, e.value
    # It is no longer listed, and a DELETE of it is a no-op.
    with h.http() as c:
        assert sid not in [s["id"] for s in c.get(NS).json()["sandboxes"]]
        assert c.delete(f"{NS}/{sid}").status_code == 200
        assert c.get(f"{NS}/{sid}").json()["status"] == "failed"


def test_a_sandbox_whose_daemon_is_killed_from_inside_ends_failed_and_is_released(
    host: Host,
) -> None:
    from tensorlake.sandbox import Sandbox

    sbx = Sandbox.create(name="killer", memory_mb=128, **_sdk(host))
    assert _cgroup_dirs(sbx.sandbox_id)
    _kill_daemon_from_inside(sbx)
    _assert_ended_by_its_daemons_death(host, sbx)
    assert "killed by signal 9" in host.http().get(f"{NS}/{sbx.sandbox_id}").text
    # Its name is free again.
    again = Sandbox.create(name="killer", memory_mb=128, **_sdk(host))
    try:
        assert again.run("echo", args=["ok"]).stdout.strip() == "ok"
    finally:
        again.terminate()


def test_a_sandbox_that_outlived_a_restart_is_still_watched(state_root: Path) -> None:
    from tensorlake.sandbox import Sandbox

    h = start_host(state_root / "r", warm=0)
    try:
        sbx = Sandbox.create(memory_mb=128, **_sdk(h))
        h.stop()
        h = start_host(state_root / "r", warm=0)
        # The SDK's handle names the proxy it was made with: connect through the new host.
        sbx = Sandbox.connect(sbx.sandbox_id, **_sdk(h))
        assert sbx.run("true").exit_code == 0
        _kill_daemon_from_inside(sbx)
        _assert_ended_by_its_daemons_death(h, sbx)
    finally:
        _cleanup(h)
        h.stop()


def test_a_path_longer_than_path_max_refuses_the_snapshot_naming_it(host: Host) -> None:
    from tensorlake.sandbox import Sandbox
    from tensorlake.sandbox.exceptions import RemoteAPIError

    sbx = Sandbox.create(memory_mb=128, **_sdk(host))
    try:
        r = sbx.run("python3", args=["-c", DEEP])
        assert r.exit_code == 0 and int(r.stdout) > 4096, r.stdout + r.stderr
        with pytest.raises(RemoteAPIError) as e:
            sbx.checkpoint()
        assert e.value.status_code == 409, e.value
        assert "SNAPSHOT_UNRESTORABLE" in str(e.value) and "/root/" + "d" * 50 in str(e.value)
        with host.http() as c:
            r = c.post(f"{NS}/{sbx.sandbox_id}/copy")
            assert (r.status_code, r.json()["code"]) == (409, "SNAPSHOT_UNRESTORABLE")
            snaps = c.get(f"{NS}/{sbx.sandbox_id}/snapshots").json()["snapshots"]
            assert snaps and all(s["status"] == "failed" for s in snaps), snaps
            assert all("PATH_MAX" in s["error"] for s in snaps)
            # The sandbox is running and thawed as before.
            assert c.get(f"{NS}/{sbx.sandbox_id}").json()["status"] == "running"
        assert sbx.run("echo", args=["thawed"]).stdout.strip() == "thawed"
        # Shortened, it snapshots and restores.
        sbx.run("sh", args=["-c", "cd /root && mv " + "d" * 200 + " short"])
        sbx.run("python3", args=["-c", "import shutil; shutil.rmtree('/root/short')"])
        sbx.run("sh", args=["-c", "echo kept > /root/kept"])
        snap = sbx.checkpoint()
        restored = Sandbox.create(snapshot_id=snap.snapshot_id, **_sdk(host))
        try:
            assert restored.run("cat", args=["/root/kept"]).stdout.strip() == "kept"
        finally:
            restored.terminate()
    finally:
        sbx.terminate()


def _sandbox_netns_inode(sandbox_id: str) -> int:
    """The network namespace of the sandbox's processes, read through its cgroup."""
    ours = os.stat("/proc/self/ns/net").st_ino
    unified = next(p for p in _cgroup_dirs(sandbox_id) if "/unified/" in p)
    for pid in Path(unified, "cgroup.procs").read_text().split():
        with contextlib.suppress(OSError):
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
            if ino != ours:
                return ino
    raise AssertionError(f"no process of {sandbox_id} in a netns of its own")


def test_a_loopback_sandboxs_netns_is_held_from_launch_and_serves_its_ports(
    state_root: Path,
) -> None:
    from tensorlake.sandbox import Sandbox

    h = start_host(state_root / "n", warm=0)
    try:
        sbx = Sandbox.create(memory_mb=128, exposed_ports=[8080], **_sdk(h))
        sid = sbx.sandbox_id
        held = h.state / "sandboxes" / sid / "netns"
        # A mount of the sandbox's own namespace, made at launch: not a /proc/<pid> path.
        assert [m for m in _mounts_of(sid) if f" {held} " in m], _mounts_of(sid)
        assert os.stat(held).st_ino == _sandbox_netns_inode(sid)
        sbx.start_process("python3", args=["-c", APP, "8080"])
        target = {"Host": f"8080-{sid}.localhost"}

        def served(host: Host) -> bool:
            r = httpx.get(host.url + "/", headers=target, timeout=10)
            return r.status_code == 200 and r.text == "held"

        wait_for(lambda: served(h), timeout=10)
        # The mount outlives the host, so a restarted host reaches the port the same way.
        h.stop()
        h = start_host(state_root / "n", warm=0)
        assert os.stat(held).st_ino == _sandbox_netns_inode(sid)
        wait_for(lambda: served(h), timeout=10)
        with h.http() as c:
            assert c.delete(f"{NS}/{sid}").status_code == 200
        assert_gone(h, sid)
        assert _mounts_of(sid) == []
        r = httpx.get(h.url + "/", headers=target, timeout=10)
        assert r.status_code == 404, r.text
    finally:
        _cleanup(h)
        h.stop()


def test_a_warm_spare_whose_daemon_dies_is_replaced(state_root: Path) -> None:
    h = start_host(state_root / "w", warm=1)
    try:

        def spares() -> list[str]:
            with h.http() as c:
                live = {s["id"] for s in c.get(NS).json()["sandboxes"]}
            return [
                d.name
                for d in (h.state / "sandboxes").iterdir()
                if d.name not in live and _cgroup_dirs(d.name)
            ]

        old = str(wait_for(spares, timeout=30)[0])  # type: ignore[index]
        # Up as the host sees it (its start done), not still starting: a start that fails
        # is another path. Its daemon answering is not enough: the host's own wait for
        # that answer may not have returned yet (seen: "failed to start", status 137).
        wait_for(lambda: f"spare sandbox {old} ready" in h.log(), timeout=30)
        assert _answers(h, old)
        for pid in _daemon_pids(old):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        assert_gone(h, old)
        assert _mounts_of(old) == []
        assert f"spare sandbox {old} died" in h.log(), h.log()
        wait_for(lambda: [s for s in spares() if s != old and _daemon_pids(s)], timeout=30)
    finally:
        h.stop()


def _daemon_pids(sandbox_id: str) -> list[int]:
    """The sandbox's daemon, seen from the host (its argv, in its cgroup)."""
    unified = [p for p in _cgroup_dirs(sandbox_id) if "/unified/" in p]
    out = []
    for top in unified:
        try:  # a cgroup of a spare still starting (or failing) may go while it is read
            pids = [pid for f in Path(top).rglob("cgroup.procs") for pid in f.read_text().split()]
        except OSError:
            continue
        for pid in pids:
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                # The daemon's own argv; bwrap's (the launcher, its init) carries it too.
                if b"serve" in argv and b"--memory-reserve" in argv and b"bwrap" not in argv:
                    out.append(int(pid))
    return out


def _answers(h: Host, sandbox_id: str) -> bool:
    """Its daemon answers health on its socket (as the host, root, reaches it)."""
    d = h.state / "sandboxes" / sandbox_id
    for sock in (d / "d.sock", d / "run" / "d.sock"):
        with contextlib.suppress(httpx.HTTPError, OSError):
            transport = httpx.HTTPTransport(uds=str(sock))
            with httpx.Client(transport=transport, timeout=2) as c:
                if c.get("http://sandbox/api/v1/health").status_code == 200:
                    return True
    return False
