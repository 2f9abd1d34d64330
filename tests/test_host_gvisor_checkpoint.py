"""Memory snapshots and suspend to disk on ``sandboxd host --runtime gvisor`` (checkpoint.py).

Through the official SDK against real hosts whose gVisor sandboxes run on
gVisor's own network stack (the only one runsc can save), a gVisor host's
default: the hosts here get no ``SANDBOXD_HOST_GVISOR_NETWORK`` but the one
that keeps the ``host`` opt-out honest. Few tests, each doing much: gVisor runs on its
ptrace platform here, and every restore starts a Sentry. Each leaves no runsc
container and no runsc process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandboxd.host.runtime import checkpoint, gvisor
from sandboxd.host.runtime.cgroup import Hierarchies, host_tag
from sandboxd.host.snapshots import Snapshots

from .conftest import wait_for
from .test_host import _cleanup, assert_gone, make_state_root, start_host
from .test_host_gvisor import _network_of, _runsc_list, _runsc_processes
from .test_host_gvisor import runsc as runsc  # the fixture, on this module's state_root

# A counter kept in the shell's memory, written out at each step. Written
# beside and renamed over: `echo > file` truncates first, and a reader that
# came in between would see an empty file (it did, once, in CI).
COUNTER = (
    "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new;"
    " mv /tmp/count.new /tmp/count; sleep 0.2; done"
)
# A value that exists only in this process's memory; said again at each line on stdin.
SECRET = (
    "import os, sys\n"
    "secret = os.urandom(8).hex()\n"
    "print(secret, flush=True)\n"
    "for _ in sys.stdin:\n"
    "    print(secret, flush=True)\n"
)

# A server on epoll (asyncio): runsc 20221219 refuses to save a TCP socket
# that has a waiter ("endpoint still has waiters upon save").
HOLD = (
    "import asyncio\n"
    "async def main():\n"
    "    await asyncio.start_server(lambda r, w: None, '127.0.0.1', 7777)\n"
    "    print('held', flush=True)\n"
    "    await asyncio.sleep(3600)\n"
    "asyncio.run(main())\n"
)


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from make_state_root("sbk")


@pytest.fixture
def netstack(monkeypatch: pytest.MonkeyPatch) -> None:
    """gVisor's own network stack, as a host gets it by default: the variable unset."""
    monkeypatch.delenv(gvisor.NETWORK_ENV, raising=False)


def _count(sbx: Any) -> int:
    r = sbx.run("cat", args=["/tmp/count"])
    assert r.exit_code == 0, r.stderr
    return int(r.stdout.strip())


def _counted(sbx: Any, at_least: int) -> bool:
    """Whether the counter has reached ``at_least`` (False before its first write)."""
    r = sbx.run("cat", args=["/tmp/count"])
    return r.exit_code == 0 and int(r.stdout.strip() or 0) >= at_least


def _start_work(sbx: Any) -> tuple[int, int, str]:
    """The counter and the secret-holder; (counter pid, secret pid, the secret)."""
    from tensorlake.sandbox import StdinMode

    counter = sbx.start_process("sh", args=["-c", COUNTER])
    holder = sbx.start_process("python3", args=["-c", SECRET], stdin_mode=StdinMode.PIPE)
    wait_for(lambda: len(sbx.get_stdout(holder.pid).lines) == 1, timeout=60)
    wait_for(lambda: _counted(sbx, 5), timeout=60)
    return counter.pid, holder.pid, sbx.get_stdout(holder.pid).lines[0]


def _outputs(sbx: Any) -> str:
    return "\n".join(line for p in sbx.list_processes() for line in sbx.get_stdout(p.pid).lines)


def _tcp_listeners(sbx: Any) -> str:
    """The TCP ports listened on inside (from /proc/net/tcp)."""
    lines = sbx.read_file("/proc/net/tcp").value.decode().splitlines()[1:]
    return " ".join(str(int(w[1].split(":")[1], 16)) for w in map(str.split, lines) if w[3] == "0A")


def _ask(sbx: Any, pid: int, n: int) -> list[str]:
    """Ask the secret-holder once more; its output, once it has ``n`` lines."""
    sbx.write_stdin(pid, b"again\n")
    wait_for(lambda: len(sbx.get_stdout(pid).lines) >= n, timeout=60)
    return sbx.get_stdout(pid).lines


def _carries_on(
    sbx: Any, counter: int, holder: int, secret: str, at_least: int, asked: int
) -> None:
    """The same processes, counting on from ``at_least`` and holding ``secret``."""
    procs = {p.pid: p for p in sbx.list_processes()}
    assert procs[counter].status.value == "running" and procs[holder].status.value == "running"
    first = _count(sbx)
    # Not started again: a fresh counter would begin at 1.
    assert first >= at_least, (first, at_least)
    wait_for(lambda: _count(sbx) > first, timeout=60)
    lines = _ask(sbx, holder, asked + 1)
    assert lines == [secret] * (asked + 1), lines


def test_a_memory_snapshot_restores_running_processes_and_copies(
    state_root: Path, runsc: str, netstack: None
) -> None:
    from tensorlake.sandbox import CheckpointType, Sandbox, SandboxError

    state = state_root / "m"
    args = ["--no-net", "--runtime", "gvisor"]
    host = start_host(state, warm=0, extra_args=args)
    port = int(host.url.rsplit(":", 1)[1])
    sdk = {"api_url": host.url, "api_key": None}
    snap_id = None
    try:
        sbx = Sandbox.create(name="gv-mem", memory_mb=512, **sdk)
        counter, holder, secret = _start_work(sbx)
        before = _count(sbx)
        snap = sbx.checkpoint(checkpoint_type=CheckpointType.MEMORY)
        assert snap is not None and snap.status.value == "completed", snap
        snap_id = snap.snapshot_id
        assert snap.snapshot_type is not None and snap.snapshot_type.value == "memory"
        assert snap.size_bytes and snap.size_bytes > 100_000, snap.size_bytes
        print(f"\nmemory snapshot: {snap.size_bytes} bytes (layer archive + zstd runsc image)")
        files = sorted(p.name for p in (state / "snapshots").iterdir())
        assert files == [f"{snap_id}.mem", f"{snap_id}.tar.zst"], files
        # The original runs on, restored in place: same processes, same memory.
        assert sbx.status.value == "running"
        _carries_on(sbx, counter, holder, secret, before, asked=1)
        # A new sandbox from the snapshot: the processes as they were, not restarted.
        clone = Sandbox.create(snapshot_id=snap_id, **sdk)
        try:
            assert clone.sandbox_id != sbx.sandbox_id
            _carries_on(clone, counter, holder, secret, before, asked=1)
        finally:
            clone.terminate()
        assert_gone(host, clone.sandbox_id)
        # copy(times=2): live copies, each its own sandbox.
        out = sbx.copy(times=2).value
        ids = [c.sandbox_id for c in out.sandboxes]
        assert len(set(ids)) == 2 and sbx.sandbox_id not in ids, ids
        copies = [Sandbox.connect(i, **sdk) for i in ids]
        try:
            for c in copies:
                _carries_on(c, counter, holder, secret, before, asked=2)
            copies[0].write_file("/root/only-here", b"a")
            r = copies[1].run("sh", args=["-c", "test -e /root/only-here && echo yes || echo no"])
            assert r.stdout.strip() == "no", r.stdout + r.stderr
        finally:
            for c in copies:
                c.terminate()
        # Deleting the snapshot frees its space.
        Sandbox.delete_snapshot(snap_id, **sdk)
        snap_id = None
        wait_for(lambda: not list((state / "snapshots").iterdir()), timeout=30)
        # A save runsc would refuse (a server on epoll inside; a refused save ends
        # the Sentry in this release) is not tried: no snapshot, the sandbox runs on.
        hold = sbx.start_process("python3", args=["-c", HOLD])
        wait_for(lambda: _count(sbx) > 0 and "held" in _outputs(sbx), timeout=60)
        with pytest.raises(SandboxError, match="listening on port 7777"):
            sbx.checkpoint(checkpoint_type=CheckpointType.MEMORY)
        assert not list((state / "snapshots").iterdir())
        assert sbx.status.value == "running"
        _carries_on(sbx, counter, holder, secret, before, asked=2)
        # A copy then is of the files only, as under bubblewrap: its processes start fresh.
        (plain,) = [Sandbox.connect(c.sandbox_id, **sdk) for c in sbx.copy(times=1).value.sandboxes]
        try:
            assert [p.pid for p in plain.list_processes()] == []
            assert plain.run("echo", args=["fresh"]).stdout.strip() == "fresh"
        finally:
            plain.terminate()
        # The host stops right after runsc saved the sandbox for a snapshot, before
        # the restore in place: its next start brings it back from that image.
        sbx.kill_process(hold.pid)
        wait_for(lambda: "7777" not in _tcp_listeners(sbx), timeout=30)
        host.stop()
        gv = gvisor.Gvisor(state, host_tag(state), net=gvisor.NETSTACK)
        asyncio.run(gv.checkpoint(sbx.sandbox_id, gv.bundle(sbx.sandbox_id) / "snapshot-image"))
        # Saved: the Sentry and its Gofer exit (a moment after runsc checkpoint returns).
        wait_for(lambda: not _runsc_processes(state), timeout=30)
        host = start_host(state, port=port, warm=0, extra_args=args)
        sbx = Sandbox.connect(sbx.sandbox_id, **sdk)
        assert sbx.status.value == "running"
        _carries_on(sbx, counter, holder, secret, before, asked=3)
        sbx.terminate()
        assert_gone(host, sbx.sandbox_id)
    finally:
        if host.proc.poll() is not None:
            # Stopped mid-test (a failure between the stop and the restart): a
            # host on the same state brings back and then removes what is left.
            with contextlib.suppress(Exception):
                host = start_host(state, port=port, warm=0, extra_args=args)
        if snap_id is not None:
            with contextlib.suppress(Exception):
                Sandbox.delete_snapshot(snap_id, **sdk)
        _cleanup(host)
        host.stop()
    wait_for(lambda: not _runsc_processes(state), timeout=30)
    assert _runsc_list(runsc, state) == []


def _memory_bytes(state: Path, sandbox_id: str) -> int:
    cgroup = Hierarchies.detect(host_tag(state)).sandbox(sandbox_id)
    v1 = cgroup.dirs.get("memory")
    if v1 is not None:
        return int((v1 / "memory.usage_in_bytes").read_text())
    assert cgroup.unified is not None
    return int((cgroup.unified / "memory.current").read_text())


def test_suspend_to_disk_frees_memory_and_survives_a_host_restart(
    state_root: Path, runsc: str, netstack: None
) -> None:
    from tensorlake.sandbox import Sandbox

    state = state_root / "s"
    args = ["--no-net", "--runtime", "gvisor"]
    host = start_host(state, warm=0, extra_args=args)
    port = int(host.url.rsplit(":", 1)[1])
    try:
        # timeout_secs on a named sandbox: when it runs out, suspended to disk.
        sbx = Sandbox.create(
            name="gv-disk", memory_mb=512, timeout_secs=25, api_url=host.url, api_key=None
        )
        counter, holder, secret = _start_work(sbx)
        running = _memory_bytes(state, sbx.sandbox_id)
        bundle = state / "sandboxes" / sbx.sandbox_id / gvisor.BUNDLE
        # Left alone (a command now would resume it) until its time runs out.
        before = _count(sbx)
        wait_for(lambda: sbx.status.value == "suspended", timeout=120)
        assert (bundle / gvisor.SUSPENDED_IMAGE / checkpoint.IMAGE).stat().st_size > 100_000
        # Its processes are gone (runsc, Sentry, Gofer): it holds disk, not memory.
        assert not _runsc_processes(state)
        assert _runsc_list(runsc, state) == []
        suspended = _memory_bytes(state, sbx.sandbox_id)
        print(f"\nmemory: {running >> 20} MiB running, {suspended >> 10} KiB suspended")
        assert suspended < running // 8 and suspended < 8 << 20, (running, suspended)
        # The host restarts while it is suspended: nothing is lost.
        host.stop()
        host = start_host(state, port=port, warm=0, extra_args=args)
        sbx = Sandbox.connect(sbx.sandbox_id, api_url=host.url, api_key=None)
        assert sbx.status.value == "suspended"
        sbx.resume()
        assert sbx.status.value == "running"
        _carries_on(sbx, counter, holder, secret, before, asked=1)
        assert not (bundle / gvisor.SUSPENDED_IMAGE).exists()
        # Suspend and resume by hand, once more.
        t0 = time.monotonic()
        sbx.suspend()
        assert sbx.status.value == "suspended" and not _runsc_processes(state)
        sbx.resume()
        print(f"suspend + resume to disk: {time.monotonic() - t0:.1f} s")
        _carries_on(sbx, counter, holder, secret, before, asked=2)
        sbx.terminate()
        assert_gone(host, sbx.sandbox_id)
    finally:
        _cleanup(host)
        host.stop()
    wait_for(lambda: not _runsc_processes(state), timeout=30)
    assert _runsc_list(runsc, state) == []


def test_the_host_network_stack_refuses_memory_snapshots_and_suspends_by_freezer(
    state_root: Path, runsc: str
) -> None:
    """SANDBOXD_HOST_GVISOR_NETWORK=host (the opt-out): runs, but runsc cannot save hostinet."""
    import httpx
    from tensorlake.sandbox import CheckpointType, Sandbox, SandboxError

    from .test_host import NS

    state = state_root / "h"
    host = start_host(
        state,
        warm=0,
        extra_args=["--no-net", "--runtime", "gvisor"],
        env={gvisor.NETWORK_ENV: gvisor.HOSTINET},
    )
    try:
        sbx = Sandbox.create(name="gv-hostinet", memory_mb=512, api_url=host.url, api_key=None)
        assert _network_of(state, sbx.sandbox_id) == gvisor.HOSTINET
        assert sbx.run("sh", args=["-c", "echo $((6*7))"]).stdout.strip() == "42"
        with pytest.raises(SandboxError, match=f"{gvisor.NETWORK_ENV}={gvisor.NETSTACK}"):
            sbx.checkpoint(checkpoint_type=CheckpointType.MEMORY)
        # Its code, and a message naming the setting that enables memory snapshots.
        url = f"{host.url}{NS}/{sbx.sandbox_id}/snapshot"
        r = httpx.post(url, json={"snapshot_type": "memory"}, timeout=30)
        assert (r.status_code, r.json()["code"]) == (400, "UNSUPPORTED_SNAPSHOT_TYPE"), r.text
        why = r.json()["error"]
        assert f"{gvisor.NETWORK_ENV}={gvisor.HOSTINET}" in why and "unset" in why, why
        assert not (state / "snapshots").exists() or not list((state / "snapshots").iterdir())
        assert sbx.status.value == "running"
        sbx.suspend()  # the freezer: memory stays, the sandbox comes back as it was
        assert sbx.status.value == "suspended"
        assert _runsc_processes(state), "frozen, not saved: runsc's processes stay"
        assert not (
            state / "sandboxes" / sbx.sandbox_id / gvisor.BUNDLE / gvisor.SUSPENDED_IMAGE
        ).exists()
        sbx.resume()
        assert sbx.run("echo", args=["back"]).stdout.strip() == "back"
        # The host restarts with the default: the sandbox keeps the stack it started on.
        port = int(host.url.rsplit(":", 1)[1])
        host.stop()
        host = start_host(state, port=port, warm=0, extra_args=["--no-net", "--runtime", "gvisor"])
        sbx = Sandbox.connect(sbx.sandbox_id, api_url=host.url, api_key=None)
        assert sbx.run("echo", args=["still"]).stdout.strip() == "still"
        assert _network_of(state, sbx.sandbox_id) == gvisor.HOSTINET
        r = httpx.post(url, json={"snapshot_type": "memory"}, timeout=30)
        assert (r.status_code, r.json()["code"]) == (400, "UNSUPPORTED_SNAPSHOT_TYPE"), r.text
    finally:
        _cleanup(host)
        host.stop()


# -- pure parts ------------------------------------------------------------------------


def test_a_memory_snapshot_is_refused_where_processes_cannot_be_saved() -> None:
    with pytest.raises(Exception) as e:
        Snapshots.parse_type({"snapshot_type": "memory"})
    assert getattr(e.value, "code", None) == "UNSUPPORTED_SNAPSHOT_TYPE"
    assert "--runtime gvisor" in str(e.value) and gvisor.NETWORK_ENV in str(e.value)
    assert Snapshots.parse_type({"snapshot_type": "memory"}, memory_refusal=None) == "memory"


def test_netstack_runsc_commands_run_in_the_sandbox_netns(tmp_path: Path) -> None:
    run = gvisor.runsc_argv(
        "/usr/bin/runsc", tmp_path / "r", "ptrace", tmp_path / "b", "sbx-1", gvisor.NETSTACK
    )
    assert "--network=sandbox" in run and run[-3:] == ["run", f"--bundle={tmp_path / 'b'}", "sbx-1"]
    restore = gvisor.runsc_argv(
        "/usr/bin/runsc", tmp_path / "r", "ptrace", tmp_path / "b", "sbx-1", gvisor.NETSTACK,
        image=tmp_path / "img",
    )  # fmt: skip
    assert restore[-4:] == [
        "restore", f"--image-path={tmp_path / 'img'}", f"--bundle={tmp_path / 'b'}", "sbx-1"
    ]  # fmt: skip
    wrapped = gvisor.in_netns_argv("/run/netns/x", restore, shim=True)
    assert wrapped[:3] == ["nsenter", "--net=/run/netns/x", "--"]
    assert gvisor.NETSTACK_SHIM in wrapped and wrapped[-len(restore) :] == restore
    assert gvisor.in_netns_argv("/run/netns/x", ["runsc", "list"]) == [
        "nsenter", "--net=/run/netns/x", "--", "runsc", "list"
    ]  # fmt: skip


def test_sockets_runsc_would_refuse_to_save_are_found_first() -> None:
    from sandboxd.api.sockets import parse_proc_net_tcp

    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
    tail = " 00000000:00000000 00:00000000 00000000 0 0 {} 2\n"
    rows = [
        "   0: 0231FEA9:C33F 00000000:0000 0A" + tail.format(3),  # the daemon's listener
        "   1: 0231FEA9:C33F 0131FEA9:9A8E 01" + tail.format(4),  # this check's connection
        "   2: 0100007F:1E61 0100007F:9C40 01" + tail.format(5),  # inside the sandbox
        "   3: 0100007F:1F90 00000000:0000 0A" + tail.format(6),  # http.server (poll)
        "   4: 0100007F:1E62 00000000:0000 0A" + tail.format(7),  # asyncio (epoll)
        "   5: 0231FEA9:9C41 0131FEA9:0050 01" + tail.format(8),  # out of the sandbox
        "   6: 0231FEA9:C33F 0131FEA9:9A8F 01" + tail.format(9),  # the host's: closed first
        "   7: 0100007F:1E63 0100007F:9C42 06" + tail.format(10),  # time_wait: nothing to save
    ]
    sockets = [s.to_json() for s in parse_proc_net_tcp(header + "".join(rows), "tcp")]
    assert sockets[0]["local"] == "169.254.49.2:49983" and sockets[0]["state"] == "listen"
    poll, epoll = [{"pid": 9, "epoll": False}], [{"pid": 10, "epoll": True}]
    for s, holders in zip(sockets, [poll, poll, poll, poll, epoll, poll, poll, epoll], strict=True):
        s["holders"] = holders
    assert checkpoint.unsavable(sockets[:4] + sockets[6:]) == []
    assert checkpoint.unsavable(sockets) == [
        "a server listening on port 7778 (on epoll)",
        "a connection from port 40001 to outside the sandbox",
    ]


def test_a_poll_server_keeps_serving_across_a_memory_snapshot(
    state_root: Path, runsc: str, netstack: None
) -> None:
    """A listening server (Python's http.server: poll, not epoll) is saved and restored running."""
    import httpx
    from tensorlake.sandbox import CheckpointType, Sandbox

    from .test_host_dropin import SERVER

    state = state_root / "w"
    host = start_host(state, warm=0, extra_args=["--no-net", "--runtime", "gvisor"])
    try:
        sdk = {"api_url": host.url, "api_key": None}
        sbx = Sandbox.create(memory_mb=512, exposed_ports=[8080], **sdk)
        server = sbx.start_process("python3", args=["-c", SERVER, "8080"])
        port = host.url.rsplit(":", 1)[1]

        def get(sid: str) -> httpx.Response:
            name = f"8080-{sid}.localhost:{port}"
            return httpx.get(host.url + "/", headers={"Host": name}, timeout=30)

        wait_for(lambda: get(sbx.sandbox_id).status_code == 200, timeout=60)
        snap = sbx.checkpoint(checkpoint_type=CheckpointType.MEMORY)
        assert snap is not None and snap.status.value == "completed", snap
        assert get(sbx.sandbox_id).text == "hello from inside"  # the original serves on
        clone = Sandbox.create(snapshot_id=snap.snapshot_id, exposed_ports=[8080], **sdk)
        try:
            r = get(clone.sandbox_id)
            assert (r.status_code, r.text) == (200, "hello from inside")
            # The same process answered: restored, not started again.
            procs = {p.pid: p for p in clone.list_processes()}
            assert procs[server.pid].status.value == "running", procs
        finally:
            clone.terminate()
    finally:
        _cleanup(host)
        host.stop()


def test_an_exposed_port_is_reached_on_gvisor_s_own_network_stack(
    state_root: Path, runsc: str, netstack: None
) -> None:
    """The Sentry's loopback is not the netns's: the host goes through the daemon's tunnel."""
    import httpx
    from tensorlake.sandbox import Sandbox

    from .test_host_dropin import SERVER

    state = state_root / "p"
    host = start_host(state, warm=0, extra_args=["--no-net", "--runtime", "gvisor"])
    try:
        sbx = Sandbox.create(
            memory_mb=512, exposed_ports=[8080, 8081], api_url=host.url, api_key=None
        )
        sbx.start_process("python3", args=["-c", SERVER, "8080"])
        port = host.url.rsplit(":", 1)[1]

        def get(p: int) -> httpx.Response:
            name = f"{p}-{sbx.sandbox_id}.localhost:{port}"
            return httpx.get(host.url + "/", headers={"Host": name}, timeout=30)

        wait_for(lambda: get(8080).status_code == 200, timeout=60)
        assert get(8080).text == "hello from inside"
        # Nothing listens on the other exposed port: a 502 with its code, not a hang.
        r = get(8081)
        assert (r.status_code, r.json()["code"]) == (502, "PORT_UNREACHABLE"), r.text
    finally:
        _cleanup(host)
        host.stop()
