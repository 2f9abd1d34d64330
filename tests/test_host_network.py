"""Sandbox networking end to end: real hosts, real sandboxes, namespaces this file makes.

The machine's own network namespace and firewall are never touched. The module
fixture makes two network namespaces: a **router** (what ``--net-router``
names: it routes the sandboxes' traffic and holds the hosts' nft tables) and a
**fake internet** behind it, with the TEST-NET addresses 198.51.100.10 and
203.0.113.10 and the cloud metadata address 169.254.169.254 on its loopback,
one TCP server answering on all of them (so a blocked connection is the rule,
not a missing route). A server in the router stands in for the host's own
services. Everything is checked through the official SDK where it has a call
for it, and every namespace, process and sandbox is removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandboxd.host.network.sandbox_network import Plan
from sandboxd.host.runtime.cgroup import host_tag

from .conftest import skip_with_reason, stop_process, wait_for
from .test_host import NS, Host, _procs_mentioning, _unavailable, assert_gone, start_host

INET_ADDRS = ("198.51.100.10", "203.0.113.10", "203.0.113.20", "169.254.169.254")
UPLINK = ("172.31.255.1", "172.31.255.2")  # router, fake internet (a /30 between them)
SERVE_PORT = 8000  # the fake internet's server
HOST_PORT = 9000  # the router's server: "the host's own services"

# name:port … → "name:port RESULT" lines; a server answers with the address it was reached on.
PROBE = r"""
import errno, socket, sys
for t in sys.argv[1:]:
    h, p = t.rsplit(':', 1)
    s = socket.socket()
    s.settimeout(0.5)
    try:
        s.connect((h, int(p)))
        r = 'OPEN:' + s.recv(64).decode().strip()
    except socket.timeout:
        r = 'TIMEOUT'
    except OSError as e:
        r = errno.errorcode.get(e.errno, str(e.errno))
    print(t, r)
"""
SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', int(sys.argv[1])))
s.listen(64)
while True:
    c, _ = s.accept()
    try:
        c.sendall((c.getsockname()[0] + '\n').encode())
    except OSError:
        pass
    c.close()
"""
MY_ADDR = (
    "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
    "s.connect(('198.51.100.10', 9)); print(s.getsockname()[0])"
)
# HTTP (answers with the Host and Authorization it got) and a websocket echo, stdlib only.
APP = r"""
import base64, hashlib, socket, struct, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', int(sys.argv[1])))
s.listen(8)
while True:
    c, _ = s.accept()
    req = b''
    while b'\r\n\r\n' not in req:
        more = c.recv(4096)
        if not more:
            break
        req += more
    lines = req.decode(errors='replace').split('\r\n')
    h = {k.strip().lower(): v.strip() for k, _, v in (x.partition(':') for x in lines[1:] if x)}
    if h.get('upgrade', '').lower() != 'websocket':
        body = ('path=%s host=%s auth=%s' % (lines[0].split()[1], h.get('host'),
                h.get('authorization', '-'))).encode()
        c.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n'
                  % len(body) + body)
        c.close()
        continue
    acc = base64.b64encode(hashlib.sha1((h['sec-websocket-key']
          + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').encode()).digest()).decode()
    c.sendall(('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n'
               'Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n' % acc).encode())
    def read(n):
        b = b''
        while len(b) < n:
            x = c.recv(n - len(b))
            if not x:
                raise EOFError
            b += x
        return b
    try:
        while True:
            b1, b2 = read(2)
            op, n = b1 & 15, b2 & 127
            if n == 126:
                n = struct.unpack('>H', read(2))[0]
            mask = read(4) if b2 & 128 else b'\0\0\0\0'
            data = bytes(x ^ mask[i % 4] for i, x in enumerate(read(n)))
            if op == 8:
                c.sendall(b'\x88\x00')
                break
            out = b'echo:' + data
            c.sendall(bytes([0x80 | op, len(out)]) + out)
    except EOFError:
        pass
    c.close()
"""


def _sh(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=15)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


def _net_unavailable() -> str | None:
    reason = _unavailable()
    if reason:
        return reason
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y {pkg})"
    return None


@dataclass
class Lab:
    router: str
    inet: str
    root: Path
    procs: list[subprocess.Popen[bytes]]

    def nft(self, *args: str) -> str:
        return _sh("nsenter", f"--net=/run/netns/{self.router}", "--", "nft", *args, check=False)

    def veth_aliases(self, h: Host) -> list[str]:
        """The sandbox ids on host ``h``'s veths in the router."""
        prefix = Plan.make(host_tag(h.state), "10.0.0.0/8").ifprefix
        links = json.loads(_sh("ip", "-n", self.router, "-j", "link", "show") or "[]")
        return [x.get("ifalias", "") for x in links if x["ifname"].startswith(prefix)]

    def serve(self, netns: str, port: int) -> None:
        self.procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, "-c", SERVER, str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )


def _make_lab(lab: Lab) -> None:
    r, i = lab.router, lab.inet
    _sh("ip", "netns", "add", r)
    _sh("ip", "netns", "add", i)
    _sh("ip", "-n", r, "link", "add", "up0", "type", "veth", "peer", "name", "dn0", "netns", i)
    batch_r = (
        "link set lo up\nlink set up0 up\n"
        f"addr add {UPLINK[0]}/30 dev up0\nroute add default via {UPLINK[1]}\n"
    )
    batch_i = "link set lo up\nlink set dn0 up\n" + f"addr add {UPLINK[1]}/30 dev dn0\n"
    batch_i += "".join(f"addr add {a}/32 dev lo\n" for a in INET_ADDRS)
    _sh("ip", "-n", r, "-batch", "-", stdin=batch_r)
    _sh("ip", "-n", i, "-batch", "-", stdin=batch_i)
    lab.serve(i, SERVE_PORT)
    lab.serve(r, HOST_PORT)

    def listening() -> bool:
        probe = [sys.executable, "-c", PROBE, f"{INET_ADDRS[0]}:{SERVE_PORT}"]
        return "OPEN" in _sh("ip", "netns", "exec", r, *probe, check=False) and "OPEN" in _sh(
            "ip", "netns", "exec", r, sys.executable, "-c", PROBE, f"127.0.0.1:{HOST_PORT}"
        )

    wait_for(listening, timeout=10, interval=0.1)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    reason = _net_unavailable()
    if reason:
        skip_with_reason(reason)
    suffix = f"{os.getpid() % 100000}"
    root = Path(tempfile.mkdtemp(prefix="sbn", dir="/tmp"))
    root.chmod(0o711)  # the sandboxes' uid goes through it to their root filesystems
    lab = Lab(f"sbt-rt{suffix}", f"sbt-inet{suffix}", root, [])
    try:
        try:
            _make_lab(lab)
        except (RuntimeError, subprocess.SubprocessError) as exc:
            skip_with_reason(f"cannot make the test's network namespaces: {exc}")
        yield lab
    finally:
        for p in lab.procs:
            p.kill()
            p.wait(5)
        # The hosts' sandbox netns live outside the router: remove any a failure left.
        for d in root.iterdir() if root.exists() else []:
            prefix = host_tag(d) + "-"
            for ns in Path("/run/netns").glob(prefix + "*") if d.is_dir() else []:
                _sh("ip", "netns", "del", ns.name, check=False)
        # The router takes its veths and the hosts' nft tables with it.
        for ns in (lab.router, lab.inet):
            _sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(root, ignore_errors=True)


def _terminate_all(h: Host, headers: dict[str, str] | None = None) -> None:
    with (
        contextlib.suppress(httpx.HTTPError),
        httpx.Client(base_url=h.url, timeout=30, headers=headers or {}) as c,
    ):
        for s in c.get(NS).json()["sandboxes"]:
            c.delete(f"{NS}/{s['id']}")


def _start(lab: Lab, name: str, subnet: str, warm: int, token: str | None = None) -> Host:
    # Hosts that share a router need subnets of their own (their routes live there).
    args = ["--net-router", lab.router, "--net-subnet", subnet]
    h = start_host(lab.root / name, warm=warm, token=token, extra_args=args)
    assert "network: routed veth" in h.log(), h.log()
    return h


@contextlib.contextmanager
def _host(
    lab: Lab, name: str, subnet: str, warm: int = 1, token: str | None = None
) -> Iterator[Host]:
    h = _start(lab, name, subnet, warm, token)
    try:
        yield h
    finally:
        _terminate_all(h, {"Authorization": f"Bearer {token}"} if token else None)
        h.stop()


@pytest.fixture(scope="module")
def nethost(lab: Lab) -> Iterator[Host]:
    with _host(lab, "h", "10.88.0.0/24", warm=3) as h:
        yield h


def _sandbox(h: Host, api_key: str | None = None, **kw: Any) -> Any:
    from tensorlake.sandbox import Sandbox

    return Sandbox.create(api_url=h.url, api_key=api_key, memory_mb=256, **kw)


def _probe(sbx: Any, *targets: str) -> dict[str, str]:
    r = sbx.run("python3", args=["-c", PROBE, *targets])
    assert r.exit_code == 0, r.stderr
    return dict(line.split(" ", 1) for line in r.stdout.splitlines())


def _addr(sbx: Any) -> str:
    return sbx.run("python3", args=["-c", MY_ADDR]).stdout.strip()


def _open(result: str) -> bool:
    return result.startswith("OPEN")


A, B, C, META = (f"{a}:{SERVE_PORT}" for a in INET_ADDRS)


def _gone(lab: Lab, h: Host, sandbox_id: str) -> bool:
    tag = host_tag(h.state)
    return (
        not Path(f"/run/netns/{tag}-{sandbox_id}").exists()
        and sandbox_id not in lab.veth_aliases(h)
        and sandbox_id not in lab.nft("list", "table", "inet", tag)
    )


def test_egress_policies_deny_wins_allow_out_default_denies(lab: Lab, nethost: Host) -> None:
    policies: dict[str, dict[str, Any]] = {
        "default": {},
        "off": {"allow_internet_access": False},
        "allow_a": {"allow_internet_access": False, "allow_out": ["198.51.100.0/24"]},
        "deny_b": {"deny_out": ["203.0.113.0/24"]},
        # deny wins over allow; a non-empty allow_out is default-deny even with internet on
        "both": {"allow_out": ["203.0.113.0/24"], "deny_out": ["203.0.113.10"]},
    }
    with ThreadPoolExecutor(len(policies)) as pool:
        made = dict(
            zip(
                policies, pool.map(lambda p: _sandbox(nethost, **p), policies.values()), strict=True
            )
        )
    try:
        seen = {k: _probe(s, A, B, C, META) for k, s in made.items()}
        assert {k: [_open(r[t]) for t in (A, B, C, META)] for k, r in seen.items()} == {
            "default": [True, True, True, False],
            "off": [False, False, False, False],
            "allow_a": [True, False, False, False],
            "deny_b": [True, False, False, False],
            "both": [False, False, True, False],
        }, seen
        # Refused at once by the rule (ICMP admin-prohibited), not a missing route.
        assert seen["off"][A] == "EHOSTUNREACH" and seen["default"][META] == "EHOSTUNREACH"
        assert seen["default"][A] == f"OPEN:{INET_ADDRS[0]}"
        info = made["both"].info()
        assert info.network_policy.deny_out == ["203.0.113.10"]
        assert info.network_policy.allow_internet_access is True
        # Sandbox to sandbox: closed, even with internet on and a server listening.
        other = made["deny_b"]
        other.start_process("python3", args=["-c", SERVER, "7000"])
        wait_for(lambda: _open(_probe(other, "127.0.0.1:7000")["127.0.0.1:7000"]), timeout=10)
        target = f"{_addr(other)}:7000"
        assert _probe(made["default"], target)[target] == "EHOSTUNREACH"
        # Sandbox to host: the gateway and the router's own address are dropped.
        gw, up = f"10.88.0.1:{HOST_PORT}", f"{UPLINK[0]}:{HOST_PORT}"  # 10.88.0.0/24
        assert _probe(made["default"], gw, up) == {gw: "TIMEOUT", up: "TIMEOUT"}
        # A sandbox cannot change its own network (no CAP_NET_ADMIN over its netns).
        r = made["default"].run("sh", args=["-c", "ip addr add 10.88.9.9/32 dev eth0"])
        assert r.exit_code != 0
    finally:
        for s in made.values():
            s.terminate()
    for s in made.values():
        wait_for(lambda s=s: _gone(lab, nethost, s.sandbox_id), timeout=5)


def test_a_live_patch_replaces_and_clears_the_policy(nethost: Host) -> None:
    from tensorlake.sandbox.models import CLEAR_NETWORK_POLICY, NetworkConfig

    sbx = _sandbox(nethost)
    try:
        assert [_open(r) for r in _probe(sbx, A, B).values()] == [True, True]
        t0 = time.monotonic()
        out = sbx.update(network=NetworkConfig(deny_out=["198.51.100.10"]))
        patch_ms = (time.monotonic() - t0) * 1000
        assert out.network_policy.deny_out == ["198.51.100.10"]
        assert [_open(r) for r in _probe(sbx, A, B).values()] == [False, True]
        with httpx.Client(base_url=nethost.url, timeout=30) as c:
            url = f"{NS}/{sbx.sandbox_id}"
            # Bad input is a 400 with a code, and the policy in force stays.
            for body, code in (
                ({"network": {"allow_out": ["no-such-host.invalid"]}}, "UNRESOLVABLE_DESTINATION"),
                ({"network": {"deny_out": ["10.0.0.0/33"]}}, "INVALID_NETWORK_DESTINATION"),
                ({"network": {"deny_out": "1.2.3.4"}}, "INVALID_NETWORK"),
            ):
                r = c.patch(url, json=body)
                assert (r.status_code, r.json()["code"]) == (400, code), r.text
            assert c.get(url).json()["network_policy"]["deny_out"] == ["198.51.100.10"]
            assert [_open(r) for r in _probe(sbx, A, B).values()] == [False, True]
            r = c.post(NS, json={"network": {"deny_out": ["no-such-host.invalid"]}})
            assert (r.status_code, r.json()["code"]) == (400, "UNRESOLVABLE_DESTINATION")
        # Internet off, then cleared: back to the default.
        sbx.update(network=NetworkConfig(allow_internet_access=False))
        assert [_open(r) for r in _probe(sbx, A, B).values()] == [False, False]
        out = sbx.update(network=CLEAR_NETWORK_POLICY)
        assert out.network_policy is None
        assert [_open(r) for r in _probe(sbx, A, B).values()] == [True, True]
        print(f"\nPATCH network through the SDK: {patch_ms:.0f} ms")
    finally:
        sbx.terminate()


def test_exposed_ports_are_reached_through_the_proxy_by_host(nethost: Host) -> None:
    import aiohttp

    sbx = _sandbox(nethost, exposed_ports=[8080])
    try:
        sbx.start_process("python3", args=["-c", APP, "8080"])
        port = nethost.url.rsplit(":", 1)[1]
        info = sbx.info()
        assert info.ingress_endpoint == f"http://localhost:{port}"
        assert info.url_for_port(8080) == f"http://8080-{sbx.sandbox_id}.localhost:{port}"
        host = f"8080-{sbx.sandbox_id}.localhost:{port}"

        def get(h: str, path: str = "/x?y=1") -> httpx.Response:
            return httpx.get(nethost.url + path, headers={"Host": h}, timeout=10)

        wait_for(lambda: get(host).status_code == 200, timeout=10)
        r = get(host)
        assert r.text == f"path=/x?y=1 host={host} auth=-", r.text
        # Any path: a lifecycle route's path on that Host is the sandbox's.
        assert get(host, NS).text.startswith(f"path={NS} ")
        r = get(f"8081-{sbx.sandbox_id}.localhost:{port}")
        assert (r.status_code, r.json()["code"]) == (403, "PORT_NOT_EXPOSED")
        r = get(f"8080-sbx-0000000000000000.localhost:{port}")
        assert (r.status_code, r.json()["code"]) == (404, "SANDBOX_NOT_FOUND")
        # Exposed, but nothing listens there yet: a clear 502.
        sbx.update(exposed_ports=[8080, 8081])
        r = get(f"8081-{sbx.sandbox_id}.localhost:{port}")
        assert (r.status_code, r.json()["code"]) == (502, "PORT_UNREACHABLE")

        async def ws_echo() -> list[str]:
            async with (
                aiohttp.ClientSession() as s,
                s.ws_connect(nethost.url + "/ws", headers={"Host": host}) as ws,
            ):
                got = []
                for word in ("one", "two"):
                    await ws.send_str(word)
                    got.append((await ws.receive(timeout=10)).data)
                return got

        assert asyncio.run(asyncio.wait_for(ws_echo(), 20)) == ["echo:one", "echo:two"]
    finally:
        sbx.terminate()


def test_a_token_guards_exposed_ports_unless_unauthenticated_access(lab: Lab) -> None:
    token = "n3t-s3cret"
    auth = {"Authorization": f"Bearer {token}"}
    with _host(lab, "t", "10.88.1.0/24", warm=0, token=token) as h:
        sbx = _sandbox(h, api_key=token, exposed_ports=[8080])
        try:
            sbx.start_process("python3", args=["-c", APP, "8080"])
            host = f"8080-{sbx.sandbox_id}.localhost"

            def get(headers: dict[str, str]) -> httpx.Response:
                return httpx.get(h.url + "/", headers={"Host": host, **headers}, timeout=10)

            r = get({})
            assert (r.status_code, r.json()["code"]) == (401, "UNAUTHORIZED")
            wait_for(lambda: get(auth).status_code == 200, timeout=10)
            # The host's token is not handed to the sandbox.
            assert get(auth).text.endswith("auth=-")
            sbx.update(allow_unauthenticated_access=True)
            r = get({})
            assert r.status_code == 200 and r.text.endswith("auth=-")
            # The app's own clients' Authorization reaches the app; the host's never does.
            assert get({"Authorization": "Bearer app-token"}).text.endswith("auth=Bearer app-token")
            assert get(auth).text.endswith("auth=-")
            # The lifecycle API still wants the token.
            assert httpx.get(h.url + NS, timeout=10).status_code == 401
        finally:
            sbx.terminate()


def test_terminate_and_a_crash_leave_no_netns_veth_or_chain(lab: Lab) -> None:
    h = _start(lab, "k", "10.88.2.0/24", warm=1)
    try:
        keeper = _sandbox(h, deny_out=["203.0.113.0/24"])
        lost = _sandbox(h)
        gone = _sandbox(h)
        tag = host_tag(h.state)
        assert Path(f"/run/netns/{tag}-{gone.sandbox_id}").exists()
        assert gone.sandbox_id in lab.veth_aliases(h)
        t0 = time.monotonic()
        gone.terminate()
        print(f"\nterminate with its network: {(time.monotonic() - t0) * 1000:.0f} ms")
        wait_for(lambda: _gone(lab, h, gone.sandbox_id), timeout=5)
        # The host dies; "lost" dies with it (as after a reboot); the spare is orphaned.
        wait_for(lambda: len(list(Path("/run/netns").glob(tag + "-*"))) == 3, timeout=15)
        h.proc.kill()
        h.proc.wait()
        for p in _procs_mentioning(lost.sandbox_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        h = _start(lab, "k", "10.88.2.0/24", warm=0)
        with httpx.Client(base_url=h.url, timeout=30) as c:
            rec = c.get(f"{NS}/{lost.sandbox_id}").json()
            assert (rec["status"], rec["termination_reason"]) == ("terminated", "lost")
            assert c.get(f"{NS}/{keeper.sandbox_id}").json()["status"] == "running"
        assert_gone(h, lost.sandbox_id)
        assert _gone(lab, h, lost.sandbox_id)
        # Only the survivor's network is left, and its policy still holds.
        assert [p.name for p in Path("/run/netns").glob(tag + "-*")] == [
            f"{tag}-{keeper.sandbox_id}"
        ]
        assert lab.veth_aliases(h) == [keeper.sandbox_id]
        from tensorlake.sandbox import Sandbox

        keeper = Sandbox.connect(keeper.sandbox_id, api_url=h.url, api_key=None)  # new port
        assert [_open(r) for r in _probe(keeper, A, B).values()] == [True, False]
        keeper.terminate()
        wait_for(lambda: _gone(lab, h, keeper.sandbox_id), timeout=5)
    finally:
        if h.proc.poll() is not None:  # failed while it was down: a host to clean up with
            h = _start(lab, "k", "10.88.2.0/24", warm=0)
        _terminate_all(h)
        h.stop()
    # With no sandbox left, the host's table went with it.
    assert "sandboxes" not in lab.nft("list", "table", "inet", host_tag(lab.root / "k"))


def test_without_a_usable_router_sandboxes_fall_back_to_loopback(lab: Lab) -> None:
    h = start_host(lab.root / "f", warm=0, extra_args=["--net-router", "sbt-no-such-netns"])
    try:
        assert "networking is off" in h.log() and "does not exist" in h.log(), h.log()
        sbx = _sandbox(h, exposed_ports=[8080])
        try:
            r = sbx.run("sh", args=["-c", "cat /proc/net/dev"])
            assert "eth0" not in r.stdout and "lo:" in r.stdout
            assert not _open(_probe(sbx, A)[A])
            # Exposed ports still work: the proxy enters the sandbox's own netns.
            sbx.start_process("python3", args=["-c", APP, "8080"])
            host = f"8080-{sbx.sandbox_id}.localhost"

            def ok() -> bool:
                r = httpx.get(h.url + "/", headers={"Host": host}, timeout=10)
                return r.status_code == 200 and "auth=-" in r.text

            wait_for(ok, timeout=10)
        finally:
            sbx.terminate()
    finally:
        stop_process(h.proc)
