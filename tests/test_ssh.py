"""SSH: the daemon's ``/api/v1/ssh/*`` and the host's gateway, driven by Debian's OpenSSH client.

Two layers. The daemon's own SSH server (enabled through the API, one key
allowed) is tried directly with ``ssh``/``scp``/``sftp`` on its loopback port.
Then ``sandboxd host --ssh-port`` is tried the way a user would: ``ssh -p PORT
SANDBOX@127.0.0.1`` into real sandboxes, with keys managed by ``sandboxd host
ssh-keys``, and attacked with the wrong key, the wrong namespace, a password
and port forwarding.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import Daemon, free_port, skip_with_reason, wait_for
from .test_host import NS, Host, _cleanup, make_state_root, start_host

SSH = shutil.which("ssh")
QUIET = [
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes",
    "-o", "IdentitiesOnly=yes",
    "-o", "ConnectTimeout=20",
]  # fmt: skip


def _need_openssh() -> None:
    if SSH is None or shutil.which("scp") is None or shutil.which("ssh-keygen") is None:
        skip_with_reason("OpenSSH's client is not installed (apt-get install openssh-client)")


def _keypair(path: Path) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
    )
    return path


def _ssh(
    key: Path, port: int, user: str, *remote: str, stdin: bytes | None = None, tty: bool = False
) -> subprocess.CompletedProcess[bytes]:
    argv = [SSH or "ssh", "-i", str(key), "-p", str(port), *QUIET]
    argv += ["-tt"] if tty else []
    return subprocess.run(
        [*argv, f"{user}@127.0.0.1", *remote],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=60,
    )


def _scp(key: Path, port: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["scp", "-i", str(key), "-P", str(port), *QUIET, *args], capture_output=True, timeout=60
    )


# --- the daemon's SSH server ---


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    _need_openssh()
    return _keypair(tmp_path / "proxy"), _keypair(tmp_path / "intruder")


def _enable(d: Daemon, key: Path, user: str | None = "root") -> httpx.Response:
    body: dict[str, object] = {"proxy_pubkey": key.with_suffix(".pub").read_text()}
    if user is not None:
        body["backend_user"] = user
    return httpx.post(f"{d.url}/api/v1/ssh/enable", json=body, timeout=10)


def test_daemon_ssh_enable_status_disable_and_one_key(
    make_daemon: Callable[..., Daemon], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    proxy, intruder = keys
    d = make_daemon()
    off = httpx.get(f"{d.url}/api/v1/ssh/status").json()
    assert off == {"enabled": False, "pid": None, "host_key_fingerprint": None, "port": None}

    on = _enable(d, proxy)
    assert on.status_code == 200, on.text
    st = on.json()
    assert st["enabled"] and st["pid"] == d.proc.pid
    assert st["host_key_fingerprint"].startswith("SHA256:")
    port = st["port"]

    r = _ssh(proxy, port, "root", "echo hi; echo oops >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"hi\n", b"oops\n")
    # Killed by a signal: OpenSSH's client says 255 and names the signal.
    r = _ssh(proxy, port, "root", "kill -TERM $$")
    assert r.returncode == 255

    # Only the enabled key: another one is refused, and passwords are not offered.
    r = _ssh(intruder, port, "root", "true")
    assert r.returncode == 255 and b"Permission denied (publickey)" in r.stderr
    # A second enable replaces the key and keeps the host key (clients pinned it).
    again = _enable(d, intruder).json()
    assert again["host_key_fingerprint"] == st["host_key_fingerprint"]
    assert again["port"] == port
    assert _ssh(intruder, port, "root", "true").returncode == 0
    assert _ssh(proxy, port, "root", "true").returncode == 255

    off = httpx.post(f"{d.url}/api/v1/ssh/disable", timeout=10).json()
    assert off["enabled"] is False and off["pid"] is None
    r = _ssh(intruder, port, "root", "true")
    assert r.returncode == 255 and b"refused" in r.stderr.lower()


def test_daemon_ssh_bad_input_gets_a_code(
    make_daemon: Callable[..., Daemon], keys: tuple[Path, Path]
) -> None:
    proxy, _ = keys
    d = make_daemon()
    url = f"{d.url}/api/v1/ssh/enable"
    cases = [
        ({"proxy_pubkey": "not a key"}, "INVALID_PUBLIC_KEY"),
        ({}, "INVALID_PUBLIC_KEY"),
        ({"proxy_pubkey": 7}, "INVALID_PUBLIC_KEY"),
        ({"proxy_pubkey": proxy.with_suffix(".pub").read_text(), "backend_user": ""}, "INVALID_USER"),
        # The contract's default user, absent on this machine: said so, not a 500.
        ({"proxy_pubkey": proxy.with_suffix(".pub").read_text()}, "USER_NOT_FOUND"),
    ]
    for body, code in cases:
        r = httpx.post(url, json=body, timeout=10)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["code"] == code, (body, r.text)
    assert httpx.get(f"{d.url}/api/v1/ssh/status").json()["enabled"] is False


def test_daemon_ssh_streams_byte_exact_and_copies_files(
    make_daemon: Callable[..., Daemon], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    proxy, _ = keys
    d = make_daemon()
    port = _enable(d, proxy).json()["port"]
    blob = os.urandom(8 << 20)
    r = _ssh(proxy, port, "root", "cat", stdin=blob)
    assert r.returncode == 0 and r.stdout == blob  # back-pressured both ways, nothing dropped

    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(1 << 20))
    for mode in ([], ["-O"]):  # SFTP (scp's default since OpenSSH 9) and the legacy protocol
        dst = tmp_path / f"copy{len(mode)}.bin"
        r = _scp(proxy, port, *mode, str(src), f"root@127.0.0.1:{dst}")
        assert r.returncode == 0, r.stderr
        assert dst.read_bytes() == src.read_bytes()


# --- the host's gateway ---


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from make_state_root("sbssh")


@pytest.fixture(scope="module")
def gateway(state_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, int, Path, Path]]:
    _need_openssh()
    keydir = tmp_path_factory.mktemp("sshkeys")
    alice, bob = _keypair(keydir / "alice"), _keypair(keydir / "bob")
    state = state_root / "s"
    state.mkdir()
    # The operator's commands: alice may reach "default", bob only "team-b".
    for ns, key in (("default", alice), ("team-b", bob)):
        add = subprocess.run(
            [sys.executable, "-m", "sandboxd", "host", "ssh-keys", "add", "--state-dir", str(state),
             "--namespace", ns, str(key.with_suffix(".pub"))],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert add.returncode == 0, add.stderr
        assert "SHA256:" in add.stdout
    ssh_port = free_port()
    h = start_host(state, warm=0, extra_args=["--no-net", "--ssh-port", str(ssh_port)])
    yield h, ssh_port, alice, bob
    _cleanup(h)
    h.stop()


def _sandbox(h: Host, name: str | None = None) -> str:
    with h.http() as c:
        r = c.post(NS, json={"name": name} if name else {})
        assert r.status_code == 200, r.text
        return str(r.json()["sandbox_id"])


def test_ssh_into_a_sandbox_by_name_and_id(gateway: tuple[Host, int, Path, Path]) -> None:
    h, port, alice, _ = gateway
    sid = _sandbox(h, "web")
    try:
        r = _ssh(alice, port, "web", "hostname; cat /etc/hostname; exit 7")
        assert r.returncode == 7, r.stderr
        assert sid.encode() in r.stdout
        r = _ssh(alice, port, sid, "id -u")
        assert (r.returncode, r.stdout) == (0, b"0\n")  # the sandbox's root
        r = _ssh(alice, port, "web+default", "echo ok")
        assert r.stdout == b"ok\n"
        # A shell on a terminal: the client's keys in, the terminal's output back.
        r = _ssh(alice, port, "web", stdin=b"echo $((6*7)); exit 4\n", tty=True)
        assert r.returncode == 4
        assert b"42" in r.stdout
        # The sandbox sees the session's processes; the SDK sees what SSH wrote.
        r = _ssh(alice, port, "web", "echo written-over-ssh > /tmp/from-ssh")
        assert r.returncode == 0
        from tensorlake.sandbox import Sandbox

        sbx = Sandbox.connect(sid, api_url=h.url, api_key=None)
        assert bytes(sbx.read_file("/tmp/from-ssh").value) == b"written-over-ssh\n"
    finally:
        with h.http() as c:
            c.delete(f"{NS}/{sid}")


def test_scp_and_sftp_move_files_both_ways(
    gateway: tuple[Host, int, Path, Path], tmp_path: Path
) -> None:
    h, port, alice, _ = gateway
    sid = _sandbox(h)
    try:
        src = tmp_path / "up.bin"
        src.write_bytes(os.urandom(3 << 20))
        r = _scp(alice, port, str(src), f"{sid}@127.0.0.1:/tmp/up.bin")
        assert r.returncode == 0, r.stderr
        r = _ssh(alice, port, sid, "sha256sum /tmp/up.bin")
        assert r.stdout.split()[0].decode() == hashlib.sha256(src.read_bytes()).hexdigest()
        back = tmp_path / "back.bin"
        r = _scp(alice, port, "-O", f"{sid}@127.0.0.1:/tmp/up.bin", str(back))
        assert r.returncode == 0, r.stderr
        assert back.read_bytes() == src.read_bytes()
        batch = tmp_path / "batch"
        batch.write_text(f"put {src} /tmp/via-sftp\nls -l /tmp/via-sftp\nget /tmp/via-sftp {tmp_path}/got\n")
        r = subprocess.run(
            ["sftp", "-i", str(alice), "-P", str(port), *QUIET, "-b", str(batch), f"{sid}@127.0.0.1"],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "got").read_bytes() == src.read_bytes()
        # A stream through the gateway and back, byte exact, 8 SSH windows' worth.
        blob = os.urandom(16 << 20)
        r = _ssh(alice, port, sid, "cat", stdin=blob)
        assert r.returncode == 0, r.stderr
        assert len(r.stdout) == len(blob) and r.stdout == blob
    finally:
        with h.http() as c:
            c.delete(f"{NS}/{sid}")


def test_a_slow_reader_gets_all_the_output_before_the_exit_status(
    gateway: tuple[Host, int, Path, Path],
) -> None:
    """The command ends while most of its output still waits in the gateway for the user.

    The gateway stops reading the sandbox while the user is behind, so the
    inner exit status arrives with output still queued behind it; ending the
    user's channel at that moment cut the output short (exit status 0, data
    missing: seen under load in CI, made certain here by a reader that is
    always behind).
    """
    h, port, alice, _ = gateway
    sid = _sandbox(h)
    try:
        count = 1_500_000  # `seq` writes about 10 MiB, then exits 3
        argv = [SSH or "ssh", "-i", str(alice), "-p", str(port), *QUIET, f"{sid}@127.0.0.1"]
        with subprocess.Popen(
            [*argv, f"seq {count}; exit 3"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
        ) as proc:
            assert proc.stdout is not None
            got = bytearray()
            while chunk := proc.stdout.read(256 << 10):
                got += chunk
                time.sleep(0.02)  # about 12 MB/s: slower than the sandbox writes
            assert proc.wait(timeout=60) == 3
        want = "".join(f"{i}\n" for i in range(1, count + 1)).encode()
        assert len(got) == len(want) and got == want
    finally:
        with h.http() as c:
            c.delete(f"{NS}/{sid}")


def test_the_gateway_refuses_wrong_keys_namespaces_passwords_and_forwarding(
    gateway: tuple[Host, int, Path, Path], tmp_path: Path
) -> None:
    h, port, alice, bob = gateway
    sid = _sandbox(h, "guarded")
    try:
        # bob's key reaches team-b only: default's sandbox is refused by name, id and
        # explicit namespace, exactly like a sandbox that does not exist (no oracle).
        for user in ("guarded", sid, "guarded+default", "guarded+team-b", "no-such-sandbox"):
            r = _ssh(bob, port, user, "true")
            assert r.returncode == 255, (user, r.stdout)
            assert b"Permission denied (publickey)" in r.stderr, (user, r.stderr)
        stranger = _keypair(tmp_path / "stranger")
        assert _ssh(stranger, port, "guarded", "true").returncode == 255
        # No password login is even offered.
        r = subprocess.run(
            [SSH or "ssh", "-p", str(port), *QUIET, "-o", "PubkeyAuthentication=no",
             "guarded@127.0.0.1", "true"],
            capture_output=True, timeout=30,
        )  # fmt: skip
        assert r.returncode == 255 and b"Permission denied (publickey)" in r.stderr
        # Port forwarding through the gateway (to the host's own loopback) is refused.
        r = subprocess.run(
            [SSH or "ssh", "-i", str(alice), "-p", str(port), *QUIET,
             "-W", f"127.0.0.1:{port}", "guarded@127.0.0.1"],
            capture_output=True, timeout=30,
        )  # fmt: skip
        assert r.returncode == 255 and b"forwarding failed" in r.stderr, r.stderr
        # Removing alice's key applies at the next login, without a restart.
        fingerprint = subprocess.run(
            ["ssh-keygen", "-l", "-E", "sha256", "-f", str(alice.with_suffix(".pub"))],
            capture_output=True, text=True, check=True,
        ).stdout.split()[1]  # fmt: skip
        base = [sys.executable, "-m", "sandboxd", "host", "ssh-keys"]
        state = ["--state-dir", str(h.state)]
        rm = subprocess.run([*base, "rm", *state, "--namespace", "default", fingerprint])
        assert rm.returncode == 0
        try:
            assert _ssh(alice, port, "guarded", "true").returncode == 255
        finally:
            subprocess.run(
                [*base, "add", *state, "--namespace", "default", str(alice.with_suffix(".pub"))],
                check=True, capture_output=True,
            )  # fmt: skip
        assert _ssh(alice, port, "guarded", "true").returncode == 0
    finally:
        with h.http() as c:
            c.delete(f"{NS}/{sid}")
    # A terminated sandbox is gone for SSH too.
    assert _ssh(alice, port, "guarded", "true").returncode == 255


def test_a_session_s_processes_end_with_its_connection(
    gateway: tuple[Host, int, Path, Path],
) -> None:
    h, port, alice, _ = gateway
    sid = _sandbox(h)
    try:
        client = subprocess.Popen(
            [SSH or "ssh", "-i", str(alice), "-p", str(port), *QUIET, f"{sid}@127.0.0.1",
             "sleep 4242 & sleep 4343"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def sleeping() -> int:
            script = (
                "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done"
                " | grep -c '^sleep 4[23]4[23]'"
            )
            r = _ssh(alice, port, sid, script)
            return int(r.stdout.strip() or b"0")

        wait_for(lambda: sleeping() >= 2, timeout=20)
        client.kill()  # the client vanishes without a goodbye
        client.wait(10)
        deadline = time.monotonic() + 20
        while sleeping() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sleeping() == 0  # the whole tree, the background job included
    finally:
        with h.http() as c:
            c.delete(f"{NS}/{sid}")


def test_ssh_into_a_gvisor_sandbox(
    state_root: Path, gateway: tuple[Host, int, Path, Path], tmp_path: Path
) -> None:
    """The same gateway path when the sandbox's kernel is gVisor's (tunnel included)."""
    from sandboxd.host.runtime import gvisor

    assert gvisor.runsc_path() is not None, "runsc is not installed (make host-deps)"
    _, _, alice, _ = gateway
    state = state_root / "g"
    state.mkdir()
    subprocess.run(
        [sys.executable, "-m", "sandboxd", "host", "ssh-keys", "add", "--state-dir", str(state),
         "--namespace", "default", str(alice.with_suffix(".pub"))],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    port = free_port()
    h = start_host(state, warm=0, extra_args=["--no-net", "--runtime", "gvisor", "--ssh-port", str(port)])
    try:
        sid = _sandbox(h, "gv")
        r = _ssh(alice, port, "gv", "cat /proc/version; exit 5")
        assert r.returncode == 5, r.stderr
        assert r.stdout.startswith(b"Linux version") and os.uname().release.encode() not in r.stdout
        r = _ssh(alice, port, "gv", stdin=b"echo $((6*7)); exit 4\n", tty=True)
        assert r.returncode == 4 and b"42" in r.stdout
        src = tmp_path / "g.bin"
        src.write_bytes(os.urandom(256 << 10))
        assert _scp(alice, port, str(src), f"{sid}@127.0.0.1:/tmp/g.bin").returncode == 0
        r = _ssh(alice, port, sid, "sha256sum /tmp/g.bin")
        assert r.stdout.split()[0].decode() == hashlib.sha256(src.read_bytes()).hexdigest()
    finally:
        _cleanup(h)
        h.stop()


def test_the_tunnel_refuses_a_huge_message_from_a_hostile_daemon(tmp_path: Path) -> None:
    """The daemon is the sandbox's: a 40 MiB websocket frame from it is refused, never assembled.

    A real aiohttp server on a unix socket plays the daemon (its root can replace
    the real one) and answers the tunnel with one frame over the proxy's cap.
    """
    import asyncio

    import aiohttp
    from aiohttp import web

    from sandboxd.host.proxy import tunnel

    async def main() -> tuple[bytes, bool]:
        async def evil(request: web.Request) -> web.StreamResponse:
            ws = web.WebSocketResponse(max_msg_size=0)
            await ws.prepare(request)
            await ws.send_bytes(b"\0" * (40 << 20))
            await ws.receive()  # until the client goes
            return ws

        app = web.Application()
        app.router.add_get("/api/v1/tunnels/tcp", evil)
        runner = web.AppRunner(app)
        await runner.setup()
        path = str(tmp_path / "d.sock")
        await web.UnixSite(runner, path).start()
        try:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as s:
                sock, carrier = await tunnel.open_tunnel(s, 22)
                reader, writer = await asyncio.open_connection(sock=sock)
                got = await asyncio.wait_for(reader.read(), 30)  # EOF: the tunnel closed
                await asyncio.wait_for(carrier, 30)
                writer.close()
                return got, carrier.done()
        finally:
            await runner.cleanup()

    got, ended = asyncio.run(main())
    assert got == b"" and ended  # nothing of the frame came through, and the tunnel ended


def test_the_gateway_closes_a_connection_after_six_key_attempts(
    gateway: tuple[Host, int, Path, Path], tmp_path: Path
) -> None:
    h, port, _, _ = gateway
    keys = [_keypair(tmp_path / f"k{i}") for i in range(9)]
    before = h.log().count("ssh: refused key")
    ids = [a for k in keys for a in ("-i", str(k))]
    r = subprocess.run(
        [SSH or "ssh", *ids, "-p", str(port), *QUIET, "nobody-here@127.0.0.1", "true"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 255
    wait_for(lambda: h.log().count("ssh: refused key") > before, timeout=10)
    assert h.log().count("ssh: refused key") - before <= 6  # then the connection is closed
