"""``sandboxd host --runtime gvisor``: sandboxes under gVisor's runsc, driven by the official SDK.

gVisor on this machine runs on its ptrace platform (slow: Python starts in
about 1.6 s under it), so these tests are few and each does much: one host,
one sandbox that goes through the SDK's basics (commands, files, a PTY, a
snapshot and its restore, suspend), and checks that nothing of runsc is left
after terminate and after the host stops. Hosts run on gVisor's own network
stack, the default (the variable is removed from their environment), but for
the cases that keep ``SANDBOXD_HOST_GVISOR_NETWORK=host`` honest; the network
policy is attacked from inside on both. The stand-in for process
descriptors (``gvisor_pidfd``) is tested on the host's kernel, with real
children. Skips only where sandboxes cannot be made at all (``test_host.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.host.runtime import bubblewrap as runtime
from sandboxd.host.runtime import gvisor, gvisor_pidfd, mounts
from sandboxd.host.runtime.cgroup import host_tag

from .conftest import wait_for
from .test_host import IMAGES, _cleanup, assert_gone, make_state_root, start_host
from .test_host_network import (
    APP,
    HOST_PORT,
    INET_ADDRS,
    MY_ADDR,
    PROBE,
    SERVE_PORT,
    SERVER,
    UPLINK,
    Lab,
)
from .test_host_network import lab as lab  # the router and fake internet namespaces


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from make_state_root("sbg")


@pytest.fixture(autouse=True)
def default_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hosts get no SANDBOXD_HOST_GVISOR_NETWORK: the default is what is tested."""
    monkeypatch.delenv(gvisor.NETWORK_ENV, raising=False)


def _network_of(state: Path, sandbox_id: str) -> str:
    """The network mode a gVisor sandbox was started with (its bundle's state)."""
    data = json.loads((state / "sandboxes" / sandbox_id / gvisor.BUNDLE / gvisor.STATE).read_text())
    return str(data["network"])


@pytest.fixture(scope="module")
def runsc(state_root: Path) -> str:
    path = gvisor.runsc_path()
    # Not a skip: where sandboxes can be made (root, Debian), `make test` installs runsc.
    assert path is not None, "runsc is not installed: apt-get install -y runsc (make host-deps)"
    problem = gvisor.available(state_root)
    assert problem is None, problem
    return path


def _runsc_list(runsc: str, state: Path) -> list[str]:
    r = subprocess.run(
        [runsc, f"--root={state / 'runsc'}", "list", "-quiet"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 or not (state / "runsc").exists(), r.stderr
    return r.stdout.split()


def _runsc_processes(state: Path) -> list[int]:
    """runsc processes (launcher, Sentry, Gofer) of this host's state dir."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (d / "cmdline").read_bytes()
                if b"runsc" in cmd and str(state).encode() in cmd:
                    pids.append(int(d.name))
    return pids


class Screen:
    """What a PTY printed (the SDK calls it from its reader thread)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self._lock:
            self._buf += data

    def expect(self, needle: str, timeout: float) -> None:
        def seen() -> bool:
            with self._lock:
                return needle in self._buf.decode(errors="replace")

        try:
            wait_for(seen, timeout)
        except BaseException:
            print(f"screen so far: {bytes(self._buf)!r}")
            raise


def test_a_gvisor_sandbox_runs_the_sdk_basics_and_leaves_nothing(
    state_root: Path, runsc: str
) -> None:
    from tensorlake.sandbox import Sandbox

    state = state_root / "s"
    # warm=1: a spare is made under gVisor too, and must go when the host stops.
    host = start_host(state, warm=1, extra_args=["--no-net", "--runtime", "gvisor"])
    sdk = {"api_url": host.url, "api_key": None}
    snap_id = None
    try:
        sbx = Sandbox.create(name="gv-basics", memory_mb=512, **sdk)
        assert _network_of(state, sbx.sandbox_id) == gvisor.NETSTACK  # the default
        # Its private link to the host carries files and output in large packets.
        ctl = gvisor.Gvisor(state, host_tag(state)).control_netns(sbx.sandbox_id)
        link = subprocess.run(
            ["ip", "-n", ctl, "-j", "link", "show", gvisor.CONTROL_IF_HOST],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert json.loads(link.stdout)[0]["mtu"] == gvisor.CONTROL_MTU, link.stdout
        # Its kernel is gVisor's Sentry, not the host's.
        r = sbx.run("cat", args=["/proc/version"])
        assert r.exit_code == 0, r.stderr
        assert r.stdout.startswith("Linux version"), r.stdout
        assert r.stdout.strip() != Path("/proc/version").read_text().strip()
        assert os.uname().release not in r.stdout, r.stdout
        r = sbx.run("sh", args=["-c", "id -u; echo $((6*7))"])
        assert r.stdout.split() == ["0", "42"], r.stdout + r.stderr
        # Files both ways; the sandbox's root owns what it writes, as under bubblewrap.
        body = os.urandom(1 << 20)
        sbx.write_file("/root/blob.bin", body)
        assert sbx.read_file("/root/blob.bin").value == body
        r = sbx.run("python3", args=["-c", "import os; print(os.stat('/root/blob.bin').st_uid)"])
        assert r.stdout.strip() == "0", r.stdout + r.stderr
        on_disk = state / "sandboxes" / sbx.sandbox_id / "rw" / "upper" / "root" / "blob.bin"
        assert on_disk.stat().st_uid == 100_000  # the image's uid range, not the host's root
        # Its overlay reads as the default runtime's: the image store sees the image in use.
        root = str(state / "sandboxes" / sbx.sandbox_id / "root")
        (overlay,) = [m for m in mounts.table() if m.point == root]
        assert overlay.source == "overlay"
        assert f"lowerdir={IMAGES / 'default' / 'rootfs'}" in overlay.options.split(","), overlay
        # A PTY through the proxy.
        screen = Screen()
        pty = sbx.create_pty(
            "bash", args=["--norc", "--noprofile"], env={"PS1": "$ "}, on_data=screen
        )
        try:
            pty.send_input("echo pty-$((6*7)); tty\n")
            screen.expect("pty-42", timeout=30)
            screen.expect("/dev/pts/", timeout=30)
        finally:
            pty.disconnect()
        # Suspend (to disk on gVisor's own stack); resume carries on.
        sbx.suspend()
        assert sbx.status.value == "suspended"
        sbx.resume()
        assert sbx.run("echo", args=["thawed"]).stdout.strip() == "thawed"
        # A filesystem snapshot of the layer, and a restore under gVisor.
        sbx.run("sh", args=["-c", "mkdir -p /root/proj && echo before > /root/proj/keep.txt"])
        snap = sbx.checkpoint()
        assert snap is not None and snap.status.value == "completed"
        snap_id = snap.snapshot_id
        sbx.run("sh", args=["-c", "echo later > /root/proj/after.txt"])
        clone = Sandbox.create(snapshot_id=snap_id, **sdk)
        try:
            r = clone.run(
                "sh",
                args=["-c", "cat /root/proj/keep.txt; test -e /root/proj/after.txt || echo no"],
            )
            assert r.stdout.split() == ["before", "no"], r.stdout + r.stderr
        finally:
            clone.terminate()
        assert_gone(host, clone.sandbox_id)
        sbx.terminate()
        assert_gone(host, sbx.sandbox_id)
        # Terminated: no container in runsc's state, no runsc process but the spare's.
        ids = _runsc_list(runsc, state)
        assert sbx.sandbox_id not in ids and clone.sandbox_id not in ids, ids
    finally:
        if snap_id is not None:
            with contextlib.suppress(Exception):
                Sandbox.delete_snapshot(snap_id, **sdk)
        _cleanup(host)
        host.stop()
    # The host stopped (and took its spare with it): nothing of runsc is left.
    wait_for(lambda: not _runsc_processes(state), timeout=15)
    assert _runsc_list(runsc, state) == []
    assert not list((state / "sandboxes").iterdir())


@pytest.mark.parametrize("stack", [gvisor.HOSTINET, gvisor.NETSTACK])
def test_a_gvisor_sandbox_keeps_its_egress_policy_and_exposed_ports(
    lab: Lab, runsc: str, stack: str
) -> None:
    """The prepared netns (veth, nft policy) on either network stack; ingress into it.

    ``host``: the Sentry's sockets are the netns's. ``sandbox`` (gVisor's own
    stack, for memory snapshots): the Sentry takes the netns's interfaces over,
    and exposed ports are reached through the daemon's tunnel.
    """
    import httpx
    from tensorlake.sandbox import Sandbox

    state = lab.root / f"gv-{stack}"
    args = ["--net-router", lab.router, "--net-subnet", "10.88.7.0/24", "--runtime", "gvisor"]
    # netstack: the default, with the variable unset; host: the opt-out.
    env = {gvisor.NETWORK_ENV: stack} if stack == gvisor.HOSTINET else None
    host = start_host(state, warm=0, extra_args=args, env=env)
    allowed, denied = (f"{a}:{SERVE_PORT}" for a in INET_ADDRS[:2])
    try:
        sbx = Sandbox.create(
            api_url=host.url,
            api_key=None,
            memory_mb=512,
            deny_out=["203.0.113.0/24"],
            exposed_ports=[8080],
        )
        assert _network_of(state, sbx.sandbox_id) == stack
        r = sbx.run("python3", args=["-c", PROBE, allowed, denied])
        seen = dict(line.split(" ", 1) for line in r.stdout.splitlines())
        assert seen[allowed] == f"OPEN:{INET_ADDRS[0]}", r.stdout
        # The router's reject is an ICMP unreachable; gVisor's own stack does not
        # turn it into EHOSTUNREACH for a connecting socket, so there the denied
        # address is a timeout. Either way nothing gets through.
        refused = {"EHOSTUNREACH"} if stack == gvisor.HOSTINET else {"EHOSTUNREACH", "TIMEOUT"}
        assert seen[denied] in refused, r.stdout
        sbx.start_process("python3", args=["-c", APP, "8080"])
        port = host.url.rsplit(":", 1)[1]
        name = f"8080-{sbx.sandbox_id}.localhost:{port}"

        def get() -> httpx.Response:
            return httpx.get(host.url + "/x", headers={"Host": name}, timeout=10)

        wait_for(lambda: get().status_code == 200, timeout=30)
        assert get().text == f"path=/x host={name} auth=-"
        if stack == gvisor.NETSTACK:
            _memory_snapshot_keeps_the_network(sbx, host.url, PROBE, allowed, denied)
        sbx.terminate()
        assert_gone(host, sbx.sandbox_id)
        wait_for(lambda: sbx.sandbox_id not in lab.veth_aliases(host), timeout=10)
    finally:
        _cleanup(host)
        host.stop()
    wait_for(lambda: not _runsc_processes(state), timeout=15)
    assert _runsc_list(runsc, state) == []


def _memory_snapshot_keeps_the_network(
    sbx: object, url: str, probe: str, allowed: str, denied: str
) -> None:
    """A networked sandbox on gVisor's stack: saved with its processes, restored with its policy."""
    from tensorlake.sandbox import CheckpointType, Sandbox

    from .test_host_gvisor_checkpoint import COUNTER, _count, _counted

    assert isinstance(sbx, Sandbox)
    for p in sbx.list_processes():  # the app listens: runsc 20221219 cannot save that
        sbx.kill_process(p.pid)
    sbx.start_process("sh", args=["-c", COUNTER])
    wait_for(lambda: _counted(sbx, 3), timeout=60)  # its first write takes a while
    snap = sbx.checkpoint(checkpoint_type=CheckpointType.MEMORY)
    assert snap is not None and snap.status.value == "completed", snap
    before = _count(sbx)
    # The network policy is the restoring create's, as for any create.
    clone = Sandbox.create(
        snapshot_id=snap.snapshot_id, deny_out=["203.0.113.0/24"], api_url=url, api_key=None
    )
    try:
        first = _count(clone)
        assert first >= 3  # counting on, not from zero
        wait_for(lambda: _count(clone) > first, timeout=60)
        r = clone.run("python3", args=["-c", probe, allowed, denied])
        seen = dict(line.split(" ", 1) for line in r.stdout.splitlines())
        assert seen[allowed].startswith("OPEN:"), r.stdout
        assert seen[denied] in {"EHOSTUNREACH", "TIMEOUT"}, r.stdout
    finally:
        clone.terminate()
    assert _count(sbx) >= before


# -- the network policy, attacked from inside on either stack ---------------------------

# A resolver for any name: one A record (argv[2]) for an A question, none otherwise.
DNS = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    q, peer = s.recvfrom(512)
    end = q.index(b'\0', 12) + 5
    a = q[end - 4:end - 2] == b'\0\1'
    head = q[:2] + b'\x81\x80' + q[4:6] + (b'\0\1' if a else b'\0\0') + b'\0' * 4
    ans = b'\xc0\x0c\0\1\0\1\0\0\0\x3c\0\4' + socket.inet_aton(sys.argv[2]) if a else b''
    s.sendto(head + q[12:end] + ans, peer)
"""
RESOLVE = r"""
import socket
try:
    print(socket.gethostbyname('svc.example.test'))
except OSError:
    print('FAILED')
"""
# What root inside tries against its own network; each line "name DONE|REFUSED".
TAMPER = r"""
import socket, subprocess
for name, family, kind in (('raw', socket.AF_INET, socket.SOCK_RAW),
                           ('packet', socket.AF_PACKET, socket.SOCK_RAW)):
    try:
        socket.socket(family, kind, socket.IPPROTO_ICMP if name == 'raw' else 0).close()
        print(name, 'DONE')
    except OSError:
        print(name, 'REFUSED')
for name, cmd in (('addr', 'ip addr add 10.88.8.99/32 dev eth0'),
                  ('route', 'ip route add 198.18.0.0/15 dev eth0'),
                  ('lo', 'ip addr add 10.1.2.3/32 dev lo')):
    r = subprocess.run(cmd.split(), capture_output=True)
    print(name, 'DONE' if r.returncode == 0 else 'REFUSED')
"""
# The daemon's API without its token, from inside.
NO_TOKEN = r"""
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen('http://%s/api/v1/processes' % sys.argv[1], timeout=10)
    print('OPEN')
except urllib.error.HTTPError as e:
    print(e.code)
"""


@pytest.fixture(scope="module")
def resolver(lab: Lab) -> Iterator[str]:
    """A DNS server at the host's resolver address, in the lab's fake internet."""
    from sandboxd.host.network.netpolicy import read_resolvers

    found = [str(a) for a in read_resolvers() if not a.is_loopback]
    assert found, "this machine's /etc/resolv.conf names no resolver a sandbox could reach"
    addr = found[0]
    image_conf = (IMAGES / "default" / "rootfs" / "etc" / "resolv.conf").read_text()
    assert addr in image_conf, f"the image's resolv.conf does not name {addr}: {image_conf}"
    subprocess.run(["ip", "-n", lab.inet, "addr", "replace", f"{addr}/32", "dev", "lo"], check=True)
    server = subprocess.Popen(
        ["ip", "netns", "exec", lab.inet, sys.executable, "-c", DNS, addr, INET_ADDRS[0]]
    )
    try:
        yield addr
    finally:
        server.kill()
        server.wait(5)
        subprocess.run(["ip", "-n", lab.inet, "addr", "del", f"{addr}/32", "dev", "lo"])


def _probe(sbx: object, *targets: str) -> dict[str, str]:
    r = sbx.run("python3", args=["-c", PROBE, *targets])  # type: ignore[attr-defined]
    assert r.exit_code == 0, r.stderr
    return dict(line.split(" ", 1) for line in r.stdout.splitlines())


def _resolve(sbx: object) -> str:
    env = {"RES_OPTIONS": "timeout:1 attempts:2"}
    r = sbx.run("python3", args=["-c", RESOLVE], env=env)  # type: ignore[attr-defined]
    return str(r.stdout.strip())


@pytest.mark.parametrize("stack", [gvisor.NETSTACK, gvisor.HOSTINET])
def test_root_inside_a_gvisor_sandbox_cannot_get_past_its_network_policy(
    lab: Lab, resolver: str, runsc: str, stack: str
) -> None:
    """The policy is the router's (nft on the veth's far end), whichever stack serves the
    sandbox's sockets: on gVisor's own, the Sentry owns the interfaces, not the rules."""
    from tensorlake.sandbox import Sandbox
    from tensorlake.sandbox.models import NetworkConfig

    state = lab.root / f"gva-{stack}"
    args = ["--net-router", lab.router, "--net-subnet", "10.88.8.0/24", "--runtime", "gvisor"]
    env = {gvisor.NETWORK_ENV: stack} if stack == gvisor.HOSTINET else None
    host = start_host(state, warm=0, extra_args=args, env=env)
    a, b, meta = (f"{x}:{SERVE_PORT}" for x in (INET_ADDRS[0], INET_ADDRS[1], INET_ADDRS[3]))
    sdk = {"api_url": host.url, "api_key": None, "memory_mb": 512}
    try:
        free = Sandbox.create(**sdk)
        off = Sandbox.create(allow_internet_access=False, **sdk)
        assert _network_of(state, free.sandbox_id) == stack
        seen = _probe(free, a, b, meta)
        assert seen[a] == f"OPEN:{INET_ADDRS[0]}" and seen[b].startswith("OPEN"), seen
        # Refused by the rule, whichever way the stack reports it (docs/gvisor.md).
        assert seen[meta] in {"EHOSTUNREACH", "TIMEOUT"}, seen
        assert not any(r.startswith("OPEN") for r in _probe(off, a, b).values())
        # DNS: the host's resolver, and only with internet access.
        assert _resolve(free) == INET_ADDRS[0]
        assert _resolve(off) == "FAILED"
        # Sandbox to sandbox and sandbox to host: closed.
        off.start_process("python3", args=["-c", SERVER, "7000"])
        wait_for(lambda: _probe(off, "127.0.0.1:7000")["127.0.0.1:7000"].startswith("OPEN"), 60)
        target = f"{off.run('python3', args=['-c', MY_ADDR]).stdout.strip()}:7000"
        gw, up = f"10.88.8.1:{HOST_PORT}", f"{UPLINK[0]}:{HOST_PORT}"
        seen = _probe(free, target, gw, up)
        assert not any(r.startswith("OPEN") for r in seen.values()), seen
        # Root inside cannot reshape its network: no raw or packet sockets, no addresses.
        r = free.run("python3", args=["-c", TAMPER])
        assert r.stdout.split() == [
            *("raw", "REFUSED", "packet", "REFUSED"),
            *("addr", "REFUSED", "route", "REFUSED", "lo", "REFUSED"),
        ], r.stdout + r.stderr
        # The daemon is reachable from inside, but not without its token.
        daemon = f"127.0.0.1:{gvisor.DAEMON_PORT}"
        if stack == gvisor.NETSTACK:
            daemon = f"{gvisor.CONTROL_IP}:{gvisor.DAEMON_PORT}"
            # The host's end of the private link serves nothing and routes nowhere.
            ctl = [f"{gvisor.CONTROL_HOST_IP}:{p}" for p in (gvisor.DAEMON_PORT, 22, 80)]
            seen = _probe(free, *ctl)
            assert not any(r.startswith("OPEN") for r in seen.values()), seen
        r = free.run("python3", args=["-c", NO_TOKEN, daemon])
        assert r.stdout.strip() == "401", r.stdout + r.stderr
        # A live change of the policy applies at once on this stack too.
        free.update(network=NetworkConfig(deny_out=[INET_ADDRS[0]]))
        seen = _probe(free, a, b)
        assert not seen[a].startswith("OPEN") and seen[b].startswith("OPEN"), seen
    finally:
        _cleanup(host)
        host.stop()
    wait_for(lambda: not _runsc_processes(state), timeout=15)


# -- pure parts and the process-descriptor stand-in (no runsc needed) -------------------


def test_the_bundle_runs_the_daemon_on_loopback_in_the_sandbox_netns(tmp_path: Path) -> None:
    daemon = runtime.DaemonRuntime(tag="t", sources={"py": "/usr", "p0": "/src"}, python="bin/py")
    argv = gvisor.daemon_argv(daemon)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == str(gvisor.DAEMON_PORT)
    assert "--listen-fd" not in argv and "--unix" not in argv and "--no-cgroups" in argv
    boot = argv[argv.index("-c") + 1]
    assert boot.index(gvisor.BOOT_PIDFD) < boot.index(gvisor.BOOT_MAIN)
    layout = runtime.Layout(tmp_path, "sbx-0000000000000001")
    cfg = gvisor.oci_config(
        layout, "sbx-0000000000000001", argv, netns="/run/netns/x", ro_binds=daemon.binds()
    )
    json.dumps(cfg)  # what runsc reads
    assert cfg["root"] == {"path": str(layout.root), "readonly": False}
    assert {"type": "network", "path": "/run/netns/x"} in cfg["linux"]["namespaces"]
    # No user namespace: the Gofer must run as root to reach root-only dirs.
    assert all(ns["type"] != "user" for ns in cfg["linux"]["namespaces"])
    binds = {m["destination"]: m for m in cfg["mounts"] if m["type"] == "bind"}
    assert set(binds) == {f"{runtime.INNER_RT}/py", f"{runtime.INNER_RT}/p0"}
    assert all("ro" in m["options"] for m in binds.values())
    assert not any(e.startswith("SANDBOXD_TOKEN") for e in cfg["process"]["env"])
    run = gvisor.runsc_argv("/usr/bin/runsc", tmp_path / "r", "ptrace", tmp_path / "b", "sbx-1")
    assert "--network=sandbox" in run and "--ignore-cgroups" in run and "--overlay2=none" in run
    run = gvisor.runsc_argv(
        "/usr/bin/runsc", tmp_path / "r", "ptrace", tmp_path / "b", "sbx-1", gvisor.HOSTINET
    )
    assert "--network=host" in run


def test_the_network_mode_defaults_to_netstack_and_refuses_other_values(
    tmp_path: Path, state_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert gvisor.Gvisor(tmp_path, "t").net == gvisor.NETSTACK
    monkeypatch.setenv(gvisor.NETWORK_ENV, gvisor.HOSTINET)
    assert gvisor.Gvisor(tmp_path, "t").net == gvisor.HOSTINET
    monkeypatch.setenv(gvisor.NETWORK_ENV, "hostinet")
    assert "not a gVisor network mode" in str(gvisor.available(tmp_path))
    # A host told anything else says so in one line and starts nothing.
    state = state_root / "bad-network"
    argv = [sys.executable, "-m", "sandboxd", "host", "--runtime", "gvisor", "--port", "0"]
    r = subprocess.run(
        [*argv, "--state-dir", str(state), "--images", str(IMAGES), "--no-net", "--warm", "0"],
        env={**os.environ, gvisor.NETWORK_ENV: "hostinet"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("sandboxd host: ") and f"{gvisor.NETWORK_ENV}='hostinet'" in line, line
    assert f"{gvisor.HOSTINET!r}" in line and "unset" in line, line
    assert not (state / "sandboxes").exists()


def _exiting_child(code: int, after: str = "0.2") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", f"import time; time.sleep({after}); exit({code})"]
    )


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def test_the_pidfd_stand_in_behaves_like_a_pidfd() -> None:
    # Exit: readable exactly when the child has exited; waitid reaps that child.
    child = _exiting_child(7)
    fd = gvisor_pidfd.pidfd_open(child.pid)
    try:
        assert not _readable(fd)
        assert gvisor_pidfd.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG) is None
        wait_for(lambda: _readable(fd), timeout=10)
        info = gvisor_pidfd.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
        assert info is not None and (info.si_pid, info.si_status) == (child.pid, 7)
        with pytest.raises(ChildProcessError):
            os.waitpid(child.pid, os.WNOHANG)  # reaped by the stand-in's waitid
    finally:
        os.close(fd)
        child.returncode = 0
    # Signals go to the child's pid.
    child = _exiting_child(0, after="60")
    fd = gvisor_pidfd.pidfd_open(child.pid)
    try:
        gvisor_pidfd.pidfd_send_signal(fd, signal.SIGKILL)
        wait_for(lambda: _readable(fd), timeout=10)
        info = gvisor_pidfd.waitid(os.P_PIDFD, fd, os.WEXITED)
        assert info.si_code == os.CLD_KILLED and info.si_status == signal.SIGKILL
    finally:
        os.close(fd)
        child.returncode = 0
    # A pid that is gone is refused, as pidfd_open refuses it.
    gone = _exiting_child(0, after="0")
    gone.wait()
    with pytest.raises(ProcessLookupError):
        gvisor_pidfd.pidfd_open(gone.pid)
    # The host's kernel has pidfds: nothing is replaced here.
    assert not gvisor_pidfd.needed()
    assert gvisor_pidfd.install() is False and os.waitid is gvisor_pidfd._real_waitid
